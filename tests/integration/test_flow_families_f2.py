"""The comfy backend on Flux 2 (FLUX.2-dev's layout and Mistral text encoder; ComfyUI 0.33 only) and Cosmos
Predict2 text-to-image (both hosts), which train through the generic rule of families.py, in-process on the
host's own objects, with tiny checkpoints in their real layout (family_checkpoints_f2.py; Cosmos loaded
through its detection scaffolding). Checked as test_flow_families_more.py checks Qwen-Image, AuraFlow and
HunyuanImage 2.1:
  - the backend's velocity is the host's own (its encoding, `extra_conds`, `apply_model`), and its schedule
    the host's: Flux 2's shift, Cosmos's COSMOS_RFLOW line in the core's σ (families.cosmos_max_sigma: the
    core's point and σ are converted to the host's σ_e = σ/(1 − σ) and x0 + σ_e·ε by the host's own
    `sigma` and `calculate_input`, and the output read back through its `calculate_denoised`);
  - a few LoRA steps of the core trainer with prior preservation (class images from `generate`) lower
    the held-out flow loss of the identifier prompt; the file carries `lora_unet_` keys of the blocks'
    attention and MLP Linears (no modulation) and the family's metadata; the stock LoraLoader uses every
    key and changes the model's output as the trained MODEL does; the base MODEL stays bit-identical;
  - the identifier is checked, and suggested, in the family's own tokenizer (Mistral's tekken BPE);
  - a class image equals the stock KSampler graph's image with that seed.
Cosmos's T5 pads every prompt to 512 tokens (the host's min_length); here it is left unpadded through the
host's own tokenizer option (`t5xxl_min_length` 1), as test_flow_families_more.py does for AuraFlow.
0.33's Cosmos attention calls comfy_kitchen's fused RMSNorm + RoPE, which has no backward: training goes
through the backend's switch to comfy_kitchen's eager version (flow_path._kitchen_with_backward).
"""
from __future__ import annotations

import gc
import importlib
import logging
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import family_checkpoints as fc  # noqa: E402
import family_checkpoints_f2 as f2  # noqa: E402
import family_checkpoints_llm as fl  # noqa: E402
from stock_graph import stock_image  # noqa: E402
from test_flow_families import _digest, _flow_loss, _training_data  # noqa: E402

PROMPT = "a photo of sks dog"
# family fixture -> (Backend.family, a LoRA name it must have, metadata version, architecture)
FAMILIES = {"flux2": ("flux2", "lora_unet_double_blocks_0_img_attn_qkv", "flux_2_dev", "Flux.2-dev/lora"),
            "cosmos_predict2": ("cosmos-predict2", "lora_unet_blocks_0_cross_attn_k_proj", "cosmos_predict2",
                                "cosmos-predict2/lora")}
# the tokenizer classes (0.33 ships its own T5Tokenizer for T5, 0.3.64 uses transformers' fast one)
TOKENIZER = {"flux2": "_BytePairView", "cosmos_predict2": "T5Tokenizer(Fast)?"}
STEPS = {"flux2": 4, "cosmos_predict2": 4}
LEARNING_RATE = {"flux2": 1e-2, "cosmos_predict2": 1e-2}
_LOADED: dict = {}
_UNSUPPORTED: dict = {}  # family -> why this host has none


def _cb(pack):
    return importlib.import_module(pack.__name__ + ".nodes.comfy_backend")


def _load(name):
    """(files, MODEL, CLIP, VAE) of a family, loaded once per module under inference mode."""
    if name in _UNSUPPORTED:
        pytest.skip(_UNSUPPORTED[name])
    if name not in _LOADED:
        _LOADED.clear()
        gc.collect()
        try:
            files = f2.ensure_family(name)
        except fc.FamilyUnsupported as e:
            _UNSUPPORTED[name] = str(e)
            pytest.skip(str(e))
        with f2.cosmos_detection(), torch.inference_mode():
            model, clip, vae = fl.load(files)
        if files.clip_type == "cosmos":
            clip.set_tokenizer_option("t5xxl_min_length", 1)  # see the module docstring
        _LOADED[name] = (files, model, clip, vae)
    return _LOADED[name]


@pytest.fixture(scope="module", params=list(FAMILIES))
def name(request):
    """The family fixture's name; module-scoped, so pytest runs a family's tests together (one load each)."""
    return request.param


def _host_x(model, x):
    """A [B, C, H, W] latent as the host's sampler hands it to this model (one frame for 3-D formats)."""
    return x.unsqueeze(2) if model.get_model_object("latent_format").latent_dimensions == 3 else x


def _host_point(model, x, sigma):
    """The core's point x = (1−σ)·x0 + σ·ε at σ where the host's sampler holds it: the same for CONST; for
    Cosmos's RFlow at the host's σ_e = `sigma(σ)` (its inverse of `timestep`) and x0 + σ_e·ε, which its
    `calculate_input` scales by 1/(1 + σ_e)."""
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, ms.ModelSamplingCosmosRFlow):
        return x, sigma
    host_sigma = torch.stack([torch.as_tensor(sampling.sigma(s)).float() for s in sigma])
    return x / sampling.calculate_input(host_sigma, torch.ones_like(x)), host_sigma


def _host_output(model, clip, prompt, x, sigma):
    """What the host's own path makes the diffusion model output at σ, as the backend's `predict` returns it:
    its encoding, its extra_conds, apply_model's denoised x0 (with this MODEL's patches, loaded by the memory
    manager as a sampler loads it), turned back through the sampling's own calculate_denoised, which is
    linear in the output: out = (calculate_denoised(σ, 0, x) − denoised) / (calculate_denoised(σ, 0, x) −
    calculate_denoised(σ, 1, x)); for rectified flow (CONST) that is the velocity (x − denoised) / σ."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    factor = getattr(model.get_model_object("latent_format"), "spacial_downscale_ratio", 8)  # 0.3.64: none, 8
    sampling = model.get_model_object("model_sampling")
    with torch.no_grad():
        enc = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True, return_dict=True)
        params = dict(enc)
        params["cross_attn"] = params.pop("cond")
        conds = model.model.extra_conds(noise=x, device=x.device, width=x.shape[-1] * factor,
                                        height=x.shape[-2] * factor, prompt_type="positive", **params)
        kwargs = {k: c.process_cond(batch_size=x.shape[0], device=x.device, area=None).cond for k, c in conds.items()}
        denoised = model.model.apply_model(x, sigma, **kwargs)
        at0 = sampling.calculate_denoised(sigma, torch.zeros_like(x), x)
        at1 = sampling.calculate_denoised(sigma, torch.ones_like(x), x)
    return (at0 - denoised) / (at0 - at1)


def test_predict_is_the_hosts_output(comfy_host, pack, name):
    files, model, clip, vae = _load(name)
    assert type(model.model.model_config).__name__ == files.model_class  # the host's own detection
    unet_config = model.model.model_config.unet_config
    assert {k: unet_config.get(k) for k in files.expect} == files.expect
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    assert backend.family == FAMILIES[name][0] and backend.prediction_type == "flow"
    # the schedule is the host's: Flux 2's shift e^μ; Cosmos unshifted, on the line up to sigma_max's point
    sampling = model.get_model_object("model_sampling")
    schedule = backend.schedule()
    if name == "cosmos_predict2":
        assert (schedule.shift, schedule.max_sigma) == (1.0, pytest.approx(80 / 81)) and sampling.sigma_max == 80
    else:
        assert schedule.shift == pytest.approx(np.exp(2.02)) and schedule.max_sigma is None
    prompts = [PROMPT, "a dog"]
    x = torch.randn(2, files.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.35, 0.8])
    with torch.no_grad():
        cond = backend.encode_text(prompts, size=(64, 64))
        out = backend.predict(x, sigma, cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        expected = _host_output(model, clip, prompt, *_host_point(model, _host_x(model, x[i:i + 1]), sigma[i:i + 1]))
        torch.testing.assert_close(out[i:i + 1], expected.reshape(1, *x.shape[1:]), rtol=1e-3, atol=1e-3)
    # through apply_model itself where a node wraps it (v = (x − denoised)/σ on the core's line): the same
    import comfy.patcher_extension as pe

    calls = []
    wrapped = model.clone()
    wrapped.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test",
                                 lambda run, *a, **k: calls.append(1) or run(*a, **k))
    with torch.no_grad():
        out_wrapped = _cb(pack).ComfyBackend(wrapped, clip, vae).predict(x, sigma, cond)
    assert calls
    torch.testing.assert_close(out_wrapped, out, rtol=1e-3, atol=1e-3)


def test_lora_training_lowers_flow_loss_and_loads_in_the_stock_loader(comfy_host, pack, name, tmp_path, caplog):
    import comfy.lora
    import comfy.utils
    import nodes as host_nodes
    from safetensors import safe_open

    files, model, clip, vae = _load(name)
    family, first, version, arch = FAMILIES[name]
    cb = _cb(pack)
    core = lambda m: importlib.import_module(pack.__name__ + ".dreambooth_core." + m)  # noqa: E731
    config_mod, trainer_mod, base_mod = core("config"), core("training.trainer"), core("backends.base")
    before = _digest(model.model)

    backend = cb.ComfyBackend(model, clip, vae)
    targets = backend.lora_targets(True, False)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert first in targets and all(key_map.get(n) == backend._target_keys[n][1] for n in targets)
    assert not any(re.search(r"mod|embed|final|norm", n) for n in targets), sorted(targets)
    # the identifier is checked in the tokenizer that reads the prompt, which splits the usual identifiers:
    # the suggestions come from its own vocabulary and pass the check
    kinds = [type(t).__name__ for t in backend.tokenizers()]
    assert len(kinds) == 1 and re.fullmatch(TOKENIZER[name], kinds[0]), kinds
    tokens = core("dataset.tokens")
    check = tokens.check_token(backend.tokenizers(), "sks")
    picks = tokens.suggest_tokens(backend.tokenizers(), 3)
    assert not check.single and len(picks) == 3 and repr(picks[0]) in check.message, (picks, check.message)
    assert all(tokens.check_token(backend.tokenizers(), w).single for w in picks), picks

    instance, classes, latents, cond = _training_data(backend, base_mod)
    side = 64 // backend.latent_factor
    assert latents.shape == (3, files.latent_channels, side, side)
    untrained = _flow_loss(backend, latents, cond)

    config = config_mod.TrainConfig(token="sks", class_noun="dog", resolution=64, prior=True, prior_weight=1.0,
                                    rank=4, steps=STEPS[name], learning_rate=LEARNING_RATE[name], batch_size=1, seed=0,
                                    output_dir=str(tmp_path), save_name=f"f2_{name}", save_precision="fp32",
                                    max_grad_norm=0.0, thumbnail_steps=0, gradient_checkpointing=True)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            result = trainer_mod.train(backend, config, instance, classes)
    finally:
        backend.release()
    trained = _flow_loss(cb.ComfyBackend(backend.result()[0], clip, vae), latents, cond)
    assert result.status == "completed" and trained < untrained, (untrained, trained)
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())

    lora = comfy.utils.load_torch_file(str(result.lora_path))
    names = {k.split(".")[0] for k in lora}
    assert names == set(targets)
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == (version, arch)

    shutil.copyfile(result.lora_path, f"{comfy_host.get_folder_paths('loras')[0]}/f2_{name}.safetensors")
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        lm, lc = host_nodes.LoraLoader().load_lora(model, clip, f"f2_{name}.safetensors", 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(lm.patches) == len(names), "every key patches one weight"
    x = _host_x(model, torch.randn(1, files.latent_channels, side, side, generator=torch.Generator().manual_seed(5)))
    sigma = torch.tensor([0.6])
    v_base = _host_output(model, clip, PROMPT, x, sigma)
    v_lora = _host_output(lm, lc, PROMPT, x, sigma)
    assert not torch.equal(v_base, v_lora)
    torch.testing.assert_close(v_lora, _host_output(backend.result()[0], clip, PROMPT, x, sigma), rtol=1e-3, atol=1e-3)
    assert _digest(model.model) == before, "training changed the shared base MODEL's weights"


def test_class_images_are_the_stock_ksampler_images(comfy_host, pack, name):
    """The backend's class image (seed 7, 2 Euler steps, CFG 3 against "blurry", 64×48) is the PNG of a stock
    graph with that seed: CLIPTextEncode, the family's empty latent, KSampler, VAEDecode."""
    files, model, clip, vae = _load(name)
    base = importlib.import_module(pack.__name__ + ".dreambooth_core.backends.base")
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    settings = base.SampleSettings(steps=2, guidance=3.0, sampler="euler:simple", negative_prompt="blurry",
                                   width=64, height=48)
    with torch.inference_mode():
        ours = backend.generate(["a photo of a dog"], [7], settings)[0]
    f = backend.latent_factor
    latent = _host_x(model, torch.zeros([1, files.latent_channels, 48 // f, 64 // f]))
    stock = stock_image(model, clip, vae, "a photo of a dog", "blurry", {"samples": latent}, 7, 2, 3.0, "euler",
                        "simple")
    assert ours.shape == (48, 64, 3) and np.array_equal(ours, stock)
