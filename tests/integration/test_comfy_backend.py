"""The comfy backend and the nodes' functions, in-process on ComfyUI's own objects.

Each node function is called the way ComfyUI's executor calls it: under torch.inference_mode(),
on a MODEL/CLIP/VAE loaded by the host's loader (so the weights are inference tensors).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stock_graph import stock_image  # noqa: E402


@pytest.fixture(scope="module")
def instance_folder(host):
    from PIL import Image

    folder = host.base / "input" / "subject"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        img = np.zeros((64, 64, 3), np.uint8)
        img[..., i] = 200
        img[16:48, 16:48] = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")
    return "subject"


def nodes(pack):
    return {k: v() for k, v in pack.NODE_CLASS_MAPPINGS.items()}


def backend_module(pack):
    import importlib

    return importlib.import_module(pack.__name__ + ".nodes.comfy_backend")


def eps_from_apply_model(model, x_vp, t):
    """ε the host's way: BaseModel.apply_model returns denoised x0 for x = x0 + σε (VE form)."""
    ms = model.get_model_object("model_sampling")
    sigma = ms.sigmas[t]
    x_ve = x_vp * (1 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
    return sigma, x_ve


def sample_latent(model, clip, seed=0, prompt="a photo of sks dog", steps=3):
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", pos, neg, latent, seed=seed,
                                   disable_pbar=True)


def test_pack_exports_nodes(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == {"DreamBoothDataset", "DreamBoothClassImages", "DreamBoothTrain",
                                             "DreamBoothSampleGrid", "DreamBoothLoadSubject",
                                             "DreamBoothSubjectPrompt"}
    assert pack.WEB_DIRECTORY == "./js"
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "DreamBooth"
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                assert len(value) == 2 and value[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"


def test_lora_names_are_kohya_diffusers_and_all_map_in_the_stock_loader(pack, loaded):
    import comfy.lora

    model, clip, vae = loaded
    cb = backend_module(pack)
    backend = cb.ComfyBackend(model, clip, vae, train_text_encoder=True)
    targets = backend.lora_targets(True, True, conv=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in targets
    assert "lora_unet_up_blocks_1_attentions_0_proj_out" in targets
    assert "lora_unet_mid_block_resnets_0_conv1" in targets
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in targets
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in targets
    unmapped = [n for n in targets if n not in key_map]
    assert not unmapped, unmapped[:5]
    for name, (kind, key) in backend._target_keys.items():  # the loader patches the same weight we wrap
        assert key_map[name] == (key if kind == "unet" else key)


@pytest.mark.parametrize("sampling", ["eps", "v_prediction"])
def test_predict_returns_raw_eps_or_v_consistent_with_apply_model(pack, loaded, sampling):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model, clip, vae = loaded
    with torch.inference_mode():
        patched = ModelSamplingDiscrete().patch(model, sampling, False)[0]
    cb = backend_module(pack)
    backend = cb.ComfyBackend(patched, clip, vae)
    assert backend.prediction_type == ("epsilon" if sampling == "eps" else "v_prediction")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([50, 700])
    a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        cond = backend.encode_text(["a photo of a dog"] * 2, size=(64, 64))
        out = backend.predict(noisy, t, cond)
        import comfy.model_management as mm

        mm.load_models_gpu([patched])
        ms = patched.get_model_object("model_sampling")
        sigma = ms.sigmas[t]
        x_ve = noisy * (1 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
        denoised = patched.model.apply_model(x_ve, sigma, c_crossattn=cond["context"]).float()
    s = sigma.view(-1, 1, 1, 1)
    # Invert the host's calculate_denoised: ε = (x - x0)/σ;  v = (x/(σ²+1) - x0)·sqrt(σ²+1)/σ.
    if sampling == "eps":
        expected = (x_ve - denoised) / s
    else:
        expected = (x_ve / (s ** 2 + 1) - denoised) * (s ** 2 + 1).sqrt() / s
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=2e-3)


def test_fingerprint_is_stable_across_loads_and_sees_patches(pack, loaded, mini_checkpoint):
    import comfy.sd

    model, clip, vae = loaded
    cb = backend_module(pack)
    with torch.inference_mode():
        model2, clip2, vae2 = comfy.sd.load_checkpoint_guess_config(str(mini_checkpoint))[:3]
    a = cb.ComfyBackend(model, clip, vae).fingerprint()
    assert a == cb.ComfyBackend(model2, clip2, vae2).fingerprint()
    patched = model.clone()
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    patched.add_patches({key: ("diff", (torch.ones_like(model.model.state_dict()[key]),))}, 0.5)
    assert cb.ComfyBackend(patched, clip, vae).fingerprint() != a


def test_train_lora_in_process(pack, host, loaded, instance_folder, caplog):
    """Dataset -> class images -> 3 LoRA steps; the base MODEL is bit-identical afterwards, the
    trained one differs, and the saved file loads in the stock LoraLoader with every key used."""
    import comfy.sd
    import comfy.utils

    model, clip, vae = loaded
    n = nodes(pack)
    before = sample_latent(model, clip)
    with torch.inference_mode():
        ds = n["DreamBoothDataset"].prepare(clip, instance_folder, "sks", "dog", 64, "center", True)["result"][0]
        ci = n["DreamBoothClassImages"].generate(model, clip, vae, "a photo of a dog", 2, 2, 5.0, "euler", "normal",
                                                 0, 64)
        assert ci["ui"]["generated"] == [2]
        again = n["DreamBoothClassImages"].generate(model, clip, vae, "a photo of a dog", 2, 2, 5.0, "euler",
                                                    "normal", 0, 64)
        assert again["ui"]["generated"] == [0] and again["ui"]["reused"] == [2]
        out = n["DreamBoothTrain"].train(model, clip, vae, ds, "lora", 4, 0.0, False, 3, 5e-3, 1.0, 1, 0,
                                         "inproc", False, 0, class_images=ci["result"][0])
    trained_model, trained_clip, lora_path, curve, lora_model = out["result"]
    assert trained_model is not model and curve.shape[-1] == 3
    shared = list(model.model.parameters()) + list(clip.cond_stage_model.parameters())
    assert all(p.grad is None for p in shared), "gradients were accumulated on the shared model's weights"
    assert os.path.dirname(lora_path) == host.get_folder_paths("loras")[0]
    after = sample_latent(model, clip)
    assert torch.equal(before, after), "training changed the shared base MODEL"
    trained = sample_latent(trained_model, trained_clip)
    assert not torch.equal(before, trained), "the trained MODEL samples exactly like the base"

    lora = comfy.utils.load_torch_file(lora_path)
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith("lora_unet_up_blocks_")
               or k.startswith("lora_unet_mid_block_") for k in lora)
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        lm, lc = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    via_loader = sample_latent(lm, lc)
    # fp16 file vs fp32 live adapters: close to the trained model, far from the base
    assert (via_loader - trained).abs().mean() < 0.1 * (trained - before).abs().mean()
    assert torch.equal(before, sample_latent(model, clip))

    # The `lora` output in the host's own Load LoRA Model node (and its bypass mode on hosts that have it)
    from comfy_extras.nodes_train import LoraModelLoader

    assert lora_model.keys() == lora.keys()
    modes = [{}] + ([{"bypass": True}] if hasattr(comfy.sd, "load_bypass_lora_for_models") else [])
    for extra in modes:
        with torch.inference_mode():
            if hasattr(LoraModelLoader, "execute"):  # the V3 node (0.3.65 on)
                out_model = LoraModelLoader.execute(model, lora_model, 1.0, **extra)[0]
            else:
                out_model = LoraModelLoader().load_lora_model(model, lora_model, 1.0)[0]
        via_node = sample_latent(out_model, lc)  # the text encoder is frozen here: lc is the base CLIP
        assert (via_node - trained).abs().mean() < 0.1 * (trained - before).abs().mean(), extra
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text


def test_a_unet_lora_trains_without_copies_of_the_frozen_weights(pack, host, loaded, instance_folder, monkeypatch):
    """The UNet's Linears and convolutions run through the frozen path while a LoRA trains: no weight
    wrapper on the training clone (the host would cast a fresh copy of each weight per forward and
    autograd would keep it until backward), only the small norm tensors copied once, no op through
    the host's per-call cast; the LoRA is added to the activations, and the MODEL the node hands on
    carries it as W + ΔW, which samples like the training path (test_train_lora_in_process checks
    the stock loader against it)."""
    model, clip, vae = loaded
    n = nodes(pack)
    cb = backend_module(pack)
    seen = []
    install = cb.ComfyBackend._install

    def spy(self):
        seen.append(self)
        return install(self)

    monkeypatch.setattr(cb.ComfyBackend, "_install", spy)
    before = sample_latent(model, clip)
    with torch.inference_mode():
        ds = n["DreamBoothDataset"].prepare(clip, instance_folder, "sks", "dog", 64, "center", False)["result"][0]
        casts = counted_casts(monkeypatch)
        out = n["DreamBoothTrain"].train(model, clip, vae, ds, "lora", 4, 0.0, False, 2, 5e-3, 0.0, 1, 0,
                                         "frozen_unet", False, 0)["result"]
    # Every op of the UNet (Linears, convolutions and norms) trains as torch's own op: none goes through
    # the host's per-call weight cast while autograd records (0.33 casts every op on the CPU otherwise).
    assert not [name for name, grad in casts if grad], sorted({name for name, grad in casts if grad})
    backend = seen[0]
    assert not [k for k in backend.model.weight_wrapper_patches if k.startswith("diffusion_model.")]
    unet_bytes = sum(p.nelement() * p.element_size() for p in model.model.diffusion_model.parameters())
    assert 0 < backend.frozen_copied_bytes < 0.02 * unet_bytes, (backend.frozen_copied_bytes, unet_bytes)
    # No forward of ours is left (the host's bypass loader, used by another test, leaves its own bound ones).
    left = [n for n, m in model.model.diffusion_model.named_modules()
            if "forward" in vars(m) and getattr(vars(m)["forward"], "__self__", None) is not m]
    assert not left, left[:3]
    assert [k for k in out[0].weight_wrapper_patches if k.startswith("diffusion_model.")], "no LoRA on the result"
    assert not torch.equal(before, sample_latent(out[0], out[1]))
    assert torch.equal(before, sample_latent(model, clip))


def test_second_run_in_same_process_other_settings_text_encoder(pack, host, loaded, instance_folder, monkeypatch):
    """Runs in a row with other settings: here the text encoder trains too, with gradient
    checkpointing, no prior, the host's low-VRAM loading path, and accelerate's process-wide state
    left behind by someone else's Accelerator with another precision (it is reset per run)."""
    import accelerate
    import accelerate.state
    import comfy.model_management as mm

    model, clip, vae = loaded
    n = nodes(pack)
    before = sample_latent(model, clip)
    accelerate.state.AcceleratorState._reset_state(True)  # then another node pack goes first:
    accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.LOW_VRAM)
    with torch.inference_mode():
        ds = n["DreamBoothDataset"].prepare(clip, instance_folder, "sks", "dog", 64, "random", False)["result"][0]
        out = n["DreamBoothTrain"].train(model, clip, vae, ds, "lora", 2, 1.0, True, 2, 5e-3, 0.0, 2, 1,
                                         "inproc_te", False, 0, gradient_checkpointing=True, lora_targets="attention")
    monkeypatch.undo()
    trained_model, trained_clip, lora_path, _, _ = out["result"]
    import re

    import comfy.utils

    keys = comfy.utils.load_torch_file(lora_path)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    # lora_targets="attention": only attention projections, none of proj_in/out or the feed-forward
    modules = {k.split(".")[0] for k in keys}
    assert modules and all(re.search(r"(_attn\d_to_(q|k|v|out_0)|_self_attn_(q|k|v|out)_proj)$", m) for m in modules), modules
    assert torch.equal(before, sample_latent(model, clip))
    assert not torch.equal(before, sample_latent(trained_model, trained_clip))
    dm = model.model.diffusion_model  # gradient checkpointing was undone on the shared modules
    assert all("forward" not in vars(layer) for b in list(dm.input_blocks) + list(dm.output_blocks) for layer in b)


def test_full_fine_tune_two_steps_saves_a_checkpoint(pack, host, loaded, instance_folder):
    import comfy.sd

    model, clip, vae = loaded
    n = nodes(pack)
    before = sample_latent(model, clip)
    with torch.inference_mode():
        ds = n["DreamBoothDataset"].prepare(clip, instance_folder, "sks", "dog", 64, "center", False)["result"][0]
        out = n["DreamBoothTrain"].train(model, clip, vae, ds, "full", 4, 0.0, False, 2, 1e-3, 0.0, 1, 0,
                                         "inproc_full", False, 0)
    trained_model, trained_clip, path, _, lora_model = out["result"]
    assert lora_model == {}, "full mode has no LoRA to hand on"
    assert path.endswith("inproc_full.safetensors") and os.path.isfile(path)
    assert str(host.get_output_directory()) in path
    assert torch.equal(before, sample_latent(model, clip))
    trained = sample_latent(trained_model, trained_clip)
    assert not torch.equal(before, trained)
    with torch.inference_mode():
        m2, c2 = comfy.sd.load_checkpoint_guess_config(path)[:2]
    reloaded = sample_latent(m2, c2)
    assert (reloaded - trained).abs().max() < 1e-3


def test_cancel_inside_the_backward_pass_keeps_the_last_finished_step(pack, host, loaded, instance_folder,
                                                                       monkeypatch):
    """Cancel pressed while step 2's backward pass runs. ComfyUI >= 0.3.65 raises it from the
    recomputed forward of a gradient-checkpointed layer, mid-backward: the checkpoint must be step 1's.
    0.3.64 sees the flag before step 3: step 2's. Either way, resuming reaches the weights of an
    uninterrupted run."""
    import comfy.model_management as mm
    import comfy.ops
    import comfy.utils
    from safetensors import safe_open

    model, clip, vae = loaded
    n = nodes(pack)
    cb = backend_module(pack)
    raises_inside = hasattr(comfy.ops, "run_every_op")  # the host checks Cancel in every layer's forward
    args = dict(mode="lora", rank=4, alpha=0.0, train_text_encoder=False, steps=3, learning_rate=5e-3,
                prior_weight=0.0, batch_size=1, seed=0, checkpoint_every=0, gradient_checkpointing=True)
    runs = {"n": 0}  # a layer deep in the UNet: gradient checkpointing runs it again in each backward pass

    def count(*_):  # training calls only (the thumbnail sampled after the last step runs without grad)
        if torch.is_grad_enabled():
            runs["n"] += 1

    counter = model.model.diffusion_model.output_blocks[0][0].in_layers[2].register_forward_pre_hook(count)
    try:
        with torch.inference_mode():
            ds = n["DreamBoothDataset"].prepare(clip, instance_folder, "sks", "dog", 64, "center", False)["result"][0]
            straight = n["DreamBoothTrain"].train(model, clip, vae, ds, save_name="bw_straight", resume=False,
                                                  **args)["result"][2]
    finally:
        counter.remove()
    assert runs["n"] == 2 * args["steps"], "gradient checkpointing did not recompute the UNet's layers"

    real_predict, calls, seen = cb.ComfyBackend.predict, {"n": 0}, {}

    def predict(self, *a, **kw):
        out = real_predict(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:  # step 2: Cancel arrives once its backward pass has begun

            def press_cancel(grad):
                seen["backward"] = True
                mm.interrupt_current_processing(True)

            out.register_hook(press_cancel)
        return out

    monkeypatch.setattr(cb.ComfyBackend, "predict", predict)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            n["DreamBoothTrain"].train(model, clip, vae, ds, save_name="bw_cancel", resume=False, **args)
    finally:
        mm.interrupt_current_processing(False)
        monkeypatch.undo()
    assert seen.get("backward"), "Cancel was not pressed inside the backward pass"
    ckpt = Path(host.get_output_directory()) / "dreambooth" / "bw_cancel" / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["dreambooth_checkpoint"])
    assert meta["step"] == (1 if raises_inside else 2)
    assert [h["step"] for h in meta["history"]] == list(range(1, meta["step"] + 1))
    assert not list(ckpt.parent.glob("*.partial"))

    with torch.inference_mode():
        resumed = n["DreamBoothTrain"].train(model, clip, vae, ds, save_name="bw_cancel", resume=True,
                                             **args)["result"][2]
    a, b = comfy.utils.load_torch_file(straight), comfy.utils.load_torch_file(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=1e-3)


def test_importing_the_pack_is_light_and_self_contained(host):
    """Importing the pack (what ComfyUI does at start) adds only the pack's own modules: no
    accelerate/diffusers, nothing on sys.path, and it takes well under a second."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    comfy = Path(os.environ.get("COMFYUI_DIR", repo.parent / "shared" / "comfyui")).resolve()
    code = f"""
import importlib.util, json, sys, time
sys.path.insert(0, {str(comfy)!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch, numpy, PIL.Image, folder_paths, comfy.model_management, comfy.samplers, comfy.sd  # the host's own
path_before, before = list(sys.path), set(sys.modules)
t = time.perf_counter()
spec = importlib.util.spec_from_file_location("pack", {str(repo / '__init__.py')!r},
                                              submodule_search_locations=[{str(repo)!r}])
m = importlib.util.module_from_spec(spec); sys.modules["pack"] = m; spec.loader.exec_module(m)
print(json.dumps({{"seconds": time.perf_counter() - t, "new": sorted(set(sys.modules) - before),
                  "path_changed": sys.path != path_before, "nodes": sorted(m.NODE_CLASS_MAPPINGS)}}))
"""
    out = subprocess.run([sys.executable, "-B", "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    foreign = [name for name in info["new"] if name != "pack" and not name.startswith("pack.")]
    assert not foreign, foreign
    assert not info["path_changed"]
    assert info["seconds"] < 0.5, info
    assert len(info["nodes"]) == 6


@pytest.fixture(scope="module")
def mini_sdxl(host, loaded):
    """A seeded mini SDXL built from ComfyUI's own classes (no checkpoint file): the SDXL UNet
    with ADM (pooled text + size) conditioning at reduced depth, and a two-encoder CLIP (CLIP-L
    768 + CLIP-G 1280 wide, 3 layers each) with SDXL's tokenizers."""
    import json

    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import mini_checkpoint as mc

    folder = host.base / "mini_sdxl"
    folder.mkdir(exist_ok=True)
    base_cfg = json.loads((Path(comfy.sd1_clip.__file__).parent / "sd1_clip_config.json").read_text())
    l_cfg = dict(base_cfg, num_hidden_layers=3)
    g_cfg = dict(base_cfg, num_hidden_layers=3, hidden_size=1280, intermediate_size=2560, num_attention_heads=20,
                 projection_dim=1280)
    (folder / "l.json").write_text(json.dumps(l_cfg))
    (folder / "g.json").write_text(json.dumps(g_cfg))

    class MiniSDXLClip(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, model_options=model_options,
                                                     textmodel_json_config=str(folder / "l.json"))
            self.clip_g = comfy.sd1_clip.SDClipModel(
                device=device, layer="hidden", layer_idx=-2, textmodel_json_config=str(folder / "g.json"), dtype=dtype,
                special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    unet_config = {"model_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [0, 1],
                   "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1, "context_dim": 2048,
                   "adm_in_channels": 2816, "num_classes": "sequential", "use_temporal_attention": False,
                   "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
                   "num_head_channels": 32, "num_heads": -1, "image_size": 32, "use_spatial_transformer": True,
                   "legacy": False, "dtype": torch.float32}
    config = comfy.supported_models.SDXL(unet_config)
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():  # as the host's loader runs
        base = config.get_model({}, device="cpu")
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, MiniSDXLClip),
                             model_options={"dtype": torch.float32})
        for prefix, module in (("sdxl.unet.", base.diffusion_model), ("sdxl.clip.", clip.cond_stage_model)):
            for name, t in module.state_dict().items():
                if t.ndim and not name.endswith("position_ids"):
                    mc._init_(prefix + name, t, 0)
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return model, clip, loaded[2]


def test_sdxl_names_conditioning_and_training(pack, mini_sdxl, instance_folder):
    import comfy.lora

    model, clip, vae = mini_sdxl
    cb = backend_module(pack)
    assert len(cb.clip_tokenizers(clip)) == 2
    backend = cb.ComfyBackend(model, clip, vae, train_text_encoder=True)
    assert backend.native_resolution == 1024 and backend.prediction_type == "epsilon"
    targets = backend.lora_targets(True, True)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_1_") for n in targets)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_0_") for n in targets)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in targets
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert not [n for n in targets if n not in key_map]
    with torch.no_grad():
        cond = backend.encode_text(["a photo of sks dog", "a dog"], size=(64, 96))
    assert cond["context"].shape == (2, 77, 2048) and cond["y"].shape == (2, 2816)

    n = nodes(pack)
    before = sample_latent(model, clip)
    with torch.inference_mode():
        ds = n["DreamBoothDataset"].prepare(clip, instance_folder, "sks", "dog", 64, "center", False)["result"][0]
        out = n["DreamBoothTrain"].train(model, clip, vae, ds, "lora", 4, 0.0, True, 2, 1e-2, 0.0, 1, 0,
                                         "inproc_sdxl", False, 0)
    trained_model, trained_clip, lora_path, _, _ = out["result"]
    import comfy.utils

    keys = {k.split(".")[0] for k in comfy.utils.load_torch_file(lora_path)}
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert torch.equal(before, sample_latent(model, clip))
    assert not torch.equal(before, sample_latent(trained_model, trained_clip))


def test_text_encoder_gradients_are_the_same_with_gradient_checkpointing(pack, loaded):
    """The text encoder trains through ComfyUI's CLIP (made out-of-place for the run) and the
    checkpointed blocks recompute exactly what the plain forward computed."""
    import importlib

    model, clip, vae = loaded
    cb = backend_module(pack)
    lora = importlib.import_module(pack.__name__ + ".dreambooth_core.adapters")
    with torch.inference_mode(False), torch.enable_grad():
        backend = cb.ComfyBackend(model, clip, vae, train_text_encoder=True)
        torch.manual_seed(0)
        network = lora.LoRANetwork(backend.lora_targets(True, True), rank=2, alpha=2.0)
        for adapter in network.adapters.values():  # non-zero `up` so every parameter gets a gradient
            torch.nn.init.normal_(adapter.lora_up.weight, std=0.02)
        backend.attach_lora(network)
        params = list(network.parameters())
        g = torch.Generator().manual_seed(0)
        noisy, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400])

        def grads(checkpointing):
            backend.set_gradient_checkpointing(checkpointing)
            try:
                cond = backend.encode_text(["a photo of sks dog"], size=(64, 64))
                loss = backend.predict(noisy, t, cond).pow(2).mean()
                return torch.autograd.grad(loss, params)
            finally:
                backend.set_gradient_checkpointing(False)

        try:
            plain, checkpointed = grads(False), grads(True)
        finally:
            backend.release()
    te = [i for i, (n, _) in enumerate((n, p) for n, a in network.adapters.items() for p in a.parameters())
          if n.startswith("lora_te")]
    assert any(plain[i].abs().sum() > 0 for i in te), "no gradient reached the text encoder"
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-6)
    layers = list(clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers)
    assert all("forward" not in vars(m) for m in layers)  # the shared CLIP is as the host made it


def test_dataset_node_takes_a_subject_mask_per_image(pack, host, loaded):
    """An IMAGE batch with a MASK batch (ComfyUI's layouts) gives each crop its mask; a mask without
    images, or of the wrong count, is refused with what to do."""
    _, clip, _ = loaded
    n = nodes(pack)
    images = torch.rand(3, 96, 96, 3)
    masks = torch.zeros(3, 96, 96)
    masks[:, 20:70, 30:60] = 1.0
    ds = n["DreamBoothDataset"].prepare(clip, "[none]", "sks", "dog", 64, "center", False, images=images,
                                        subject_mask=masks)["result"][0]
    items = ds.prepared.items
    assert len(items) == 3 and all(it.mask is not None and it.mask.size == (64, 64) for it in items)
    on = np.asarray(items[0].mask) > 127
    assert 0.15 < on.mean() < 0.3 and on[30, 30] and not on[5, 5]
    with pytest.raises(ValueError, match="subject_mask goes with the 'images' input"):
        n["DreamBoothDataset"].prepare(clip, "[none]", "sks", "dog", 64, "center", False,
                                       subject_mask=masks)
    with pytest.raises(ValueError, match="2 mask"):
        n["DreamBoothDataset"].prepare(clip, "[none]", "sks", "dog", 64, "center", False, images=images,
                                       subject_mask=masks[:2])


def test_dataset_paths_stay_inside_the_hosts_folders(pack, host, monkeypatch):
    import importlib

    paths = importlib.import_module(pack.__name__ + ".nodes.paths")
    monkeypatch.delenv(paths.ALLOW_ANY_PATH_ENV, raising=False)
    inside = host.base / "input" / "inside"
    inside.mkdir(exist_ok=True)
    (host.base / "output" / "made").mkdir(exist_ok=True)
    outside = host.base / "elsewhere"
    outside.mkdir(exist_ok=True)
    assert paths.resolve_dataset_folder("inside") == str(inside)
    assert paths.resolve_dataset_folder(paths.NO_FOLDER, "inside") == str(inside)
    assert paths.resolve_dataset_folder(paths.NO_FOLDER, str(host.base / "output" / "made")) == str(host.base / "output" / "made")
    for bad in (str(outside), "../elsewhere", "inside/../../elsewhere", "/etc"):
        with pytest.raises(paths.PathNotAllowed, match=paths.ALLOW_ANY_PATH_ENV):
            paths.resolve_dataset_folder(paths.NO_FOLDER, bad)
    with pytest.raises(ValueError, match="no images"):
        paths.resolve_dataset_folder(paths.NO_FOLDER, "")
    monkeypatch.setenv(paths.ALLOW_ANY_PATH_ENV, "1")  # the server owner opted in
    assert paths.resolve_dataset_folder(paths.NO_FOLDER, str(outside)) == str(outside)


def test_install_script_finds_everything_in_the_host_env():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(repo / "install.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "all requirements present" in out.stdout, out.stdout + out.stderr


def test_generate_is_the_stock_ksampler_image_and_latents_use_the_models_format(pack, loaded):
    import importlib

    import nodes as host_nodes

    model, clip, vae = loaded
    cb = backend_module(pack)
    base = importlib.import_module(pack.__name__ + ".dreambooth_core.backends.base")
    backend = cb.ComfyBackend(model, clip, vae)
    settings = base.SampleSettings(steps=2, guidance=4.0, sampler="dpmpp_2m:karras", negative_prompt="blurry",
                                   width=64, height=48)
    with torch.inference_mode():
        ours = backend.generate(["a photo of a dog"], [7], settings)[0]
        latent = host_nodes.EmptyLatentImage().generate(64, 48, 1)[0]
    stock = stock_image(model, clip, vae, "a photo of a dog", "blurry", latent, 7, 2, 4.0, "dpmpp_2m", "karras")
    assert ours.shape == (48, 64, 3) and np.array_equal(ours, stock)

    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = backend.encode_images(pixels)
        raw = vae.encode(((pixels + 1) / 2).movedim(1, -1))
        decoded = backend.decode_latents(latents)
    torch.testing.assert_close(latents, raw * 0.18215)  # SD1's latent scale: what the UNet consumes
    assert decoded.shape == (1, 3, 64, 64) and decoded.min() >= -1 and decoded.max() <= 1


def test_sdxl_class_images_are_the_stock_ksampler_images(pack, mini_sdxl):
    """SDXL's conditioning (pooled text, size and crop) through the host's sampler, as a stock graph makes it."""
    import importlib

    import nodes as host_nodes

    model, clip, vae = mini_sdxl
    base = importlib.import_module(pack.__name__ + ".dreambooth_core.backends.base")
    backend = backend_module(pack).ComfyBackend(model, clip, vae)
    settings = base.SampleSettings(steps=2, guidance=5.0, sampler="euler", width=64, height=64)
    with torch.inference_mode():
        ours = backend.generate(["a photo of a dog"], [3], settings)[0]
        latent = host_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    stock = stock_image(model, clip, vae, "a photo of a dog", "", latent, 3, 2, 5.0, "euler", "normal")
    assert ours.shape == (64, 64, 3) and np.array_equal(ours, stock)


def test_a_v_prediction_model_trains_on_its_v_objective(pack, loaded, instance_folder):
    """A MODEL that samples as v-prediction (SD2-768-v, v-pred fine-tunes, or any model behind the stock
    ModelSamplingDiscrete node) trains through the Train node on the v target: the held-out v loss
    of the trained MODEL is below the untrained one's and below that of the same run on the ε model
    (which lowers it too, less), and the result still predicts v."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from PIL import Image

    model, clip, vae = loaded
    with torch.inference_mode():
        v_model = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    cb = backend_module(pack)
    import folder_paths

    images = sorted((Path(folder_paths.get_input_directory()) / instance_folder).glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32)).permute(2, 0, 1)
                          / 127.5 - 1 for p in images])

    def held_out(m) -> float:
        backend = cb.ComfyBackend(m, clip, vae)
        assert backend.prediction_type == "v_prediction"
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            x0 = backend.encode_images(pixels)
            cond = backend.encode_text(["a photo of sks dog"] * len(images), size=(64, 64))
            eps = torch.randn(x0.shape, generator=g)
            t = torch.tensor([200, 500, 800])[: len(images)]
            a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
            out = backend.predict(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, cond)
        return float(((out - (a.sqrt() * eps - (1 - a).sqrt() * x0)) ** 2).mean())

    n = nodes(pack)
    with torch.inference_mode():
        ds = n["DreamBoothDataset"].prepare(clip, instance_folder, "sks", "dog", 64, "center", False)["result"][0]
        out = n["DreamBoothTrain"].train(v_model, clip, vae, ds, "lora", 4, 0.0, False, 6, 1e-2, 0.0, 1, 0,
                                         "inproc_v", False, 0)
    trained = out["result"][0]
    # The same run on the plain ε MODEL, measured as v: what training on the wrong target would give.
    with torch.inference_mode():
        eps_trained = n["DreamBoothTrain"].train(model, clip, vae, ds, "lora", 4, 0.0, False, 6, 1e-2, 0.0, 1, 0,
                                                 "inproc_eps", False, 0)["result"][0]
        eps_trained = ModelSamplingDiscrete().patch(eps_trained, "v_prediction", False)[0]
    untrained_loss, trained_loss, eps_loss = held_out(v_model), held_out(trained), held_out(eps_trained)
    assert trained_loss < min(untrained_loss, eps_loss), (untrained_loss, trained_loss, eps_loss)


def counted_casts(monkeypatch) -> list:
    """A list that grows by (the op's class name, whether autograd records) at every call of the host's
    weight cast (comfy.ops.cast_bias_weight)."""
    import comfy.ops

    calls = []
    cast = comfy.ops.cast_bias_weight

    def counted(module, *args, **kwargs):
        calls.append((type(module).__name__, torch.is_grad_enabled()))
        return cast(module, *args, **kwargs)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", counted)
    return calls


def test_the_frozen_path_runs_plain_ops_as_torch_ops_and_casts_where_the_host_would(pack, host, monkeypatch):
    """A plain ComfyUI Linear or Conv2d whose cast would hand back its own weight and bias runs as
    torch's op (the host's cast is called once, to see that), with the host's output and dL/dx; a
    weight function added later (another node's patch), or a weight the cast must convert, goes
    through the host's forward again, so what the host would compute is what trains."""
    import importlib

    import comfy.ops

    adapters = importlib.import_module(pack.__name__ + ".nodes.adapters")
    frozen = importlib.import_module(pack.__name__ + ".dreambooth_core.adapters.frozen")
    calls = counted_casts(monkeypatch)
    torch.manual_seed(0)
    ops = comfy.ops.disable_weight_init
    for module, x in ((ops.Linear(8, 6), torch.randn(3, 8)), (ops.Conv2d(4, 5, 3, padding=1), torch.randn(1, 4, 6, 6))):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_()
        module.comfy_cast_weights = True  # as the host runs a model it manages on the CPU
        host_out = module(x)
        calls.clear()
        ff = adapters.frozen_forward(module, frozen.FrozenState())
        for _ in range(3):
            xg = x.clone().requires_grad_(True)
            y = ff(xg)
            y.square().sum().backward()
            assert torch.allclose(y, host_out, atol=1e-6)
            xh = x.clone().requires_grad_(True)
            module.weight.requires_grad_(False)
            module.bias.requires_grad_(False)
            module(xh).square().sum().backward()
            assert torch.allclose(xg.grad, xh.grad, atol=1e-5)
        # one cast to see the identity, then the host's own forward's three (the reference above): none of ours
        assert len(calls) == 1 + 3, len(calls)

        module.weight_function.append(lambda w: w * 2)  # another node's patch: the host's path again
        patched = module(x)
        assert not torch.allclose(patched, host_out)
        assert torch.allclose(ff(x.clone().requires_grad_(True)), patched, atol=1e-6)
        module.weight_function.clear()

        half = type(module).__new__(type(module))  # the same op with an fp16 weight: the cast converts it
        half.__dict__.update(module.__dict__)
        half._parameters = {k: torch.nn.Parameter(v.detach().half(), requires_grad=False)
                            for k, v in module._parameters.items()}
        manual = adapters.frozen_forward(half, frozen.FrozenState())
        calls.clear()
        out1 = manual(x)
        n1 = len(calls)
        manual(x + 1)  # another input: the Linears' cache of a repeated grad-free input does not apply
        assert (n1, len(calls)) == (2, 3), (n1, len(calls), "an fp16 weight: the host's cast at every call")
        assert torch.allclose(out1, half(x))


def test_plain_norms_run_as_torch_ops_with_the_hosts_output_and_gradients(pack, host, monkeypatch):
    """ComfyUI's GroupNorm and LayerNorm cast their weights at every call while the host manages the
    model on the CPU; as DirectOp they give the host's output and gradients (for the input and for
    the weights, which a host LoRA set may train) with one cast per dtype instead of one per call, and a
    weight function added later (another node's patch) goes through the host's forward again."""
    import importlib

    import comfy.ops

    adapters = importlib.import_module(pack.__name__ + ".nodes.adapters")
    calls = counted_casts(monkeypatch)
    torch.manual_seed(0)
    ops = comfy.ops.disable_weight_init
    for module, x in ((ops.GroupNorm(4, 8), torch.randn(2, 8, 5, 5)), (ops.LayerNorm(8), torch.randn(2, 7, 8))):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_()
        module.comfy_cast_weights = True
        direct = adapters.direct_op(module)
        assert direct is not None
        calls.clear()
        for _ in range(3):
            xd, xh = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            y = direct(xd)
            y.square().sum().backward()
            wd, bd = module.weight.grad.clone(), module.bias.grad.clone()
            module.zero_grad()
            ref = module(xh)
            ref.square().sum().backward()
            assert torch.allclose(y, ref, atol=1e-6)
            assert torch.allclose(xd.grad, xh.grad, atol=1e-5)
            assert torch.allclose(wd, module.weight.grad, atol=1e-4) and torch.allclose(bd, module.bias.grad, atol=1e-4)
            module.zero_grad()
        assert len(calls) == 1 + 3, len(calls)  # one to see the identity, then the host forwards' own three

        module.weight_function.append(lambda w: w * 2)
        with torch.no_grad():
            patched = module(x)
            assert torch.allclose(direct(x), patched, atol=1e-6)
            module.weight_function.clear()
            assert not torch.allclose(direct(x), patched, atol=1e-3)
        module.forward = lambda t: t  # another node patched the forward: left as it is
        assert adapters.direct_op(module) is None
        del module.forward
