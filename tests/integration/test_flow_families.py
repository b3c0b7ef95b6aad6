"""The comfy backend on the flow-matching families, in-process on the host's own objects.

Tiny seeded checkpoints of each family (family_checkpoints.py) load through the host's loaders under
torch.inference_mode(), as the executor runs nodes (so the weights are inference tensors). Checked:
  - the family is told from the host's detection, with its shift, and other families are refused
    up front with a message that names them;
  - `predict` (σ in, velocity out) is the velocity of the host's own `apply_model` with the conds its
    own `extra_conds` make from the host's text encoding, for prompts of different lengths too;
  - the LoRA gradient the trainer gets is the same with gradient checkpointing on and off and equals a
    finite difference of predict; checkpointing on lowers the bytes autograd keeps for backward
    (Flux, and the SD UNet path);
  - every LoRA name is a key the stock loader maps to the weight it trains (all six families);
  - a few LoRA steps of the core trainer (Flux dev, SD3, Lumina 2, Chroma; prior preservation on, two class
    images from `generate`) lower the held-out flow loss of the identifier prompt; the file carries
    kohya keys and family metadata, the stock LoraLoader node uses every key, and it changes the
    model's output as the trained MODEL does; the base MODEL stays bit-identical; no frozen Linear
    weight is copied while training;
  - the nodes (Dataset -> Class Images -> Train) train SD3.
Chroma's smallest model is big where the host hard-codes it: every forward runs the 5120-wide, 5-layer
approximator (278 M parameters) on all 344 modulation rows, ~3 s a sample on one CPU thread (80% of a
training step; the 3072-wide blocks, 340 M parameters on ~26 tokens, and the text encoder take the
rest), so its training test takes 2 steps and ~60 s of CPU.
On 0.3.64 Flux is 3072 wide (the host hard-codes it): there its T5 is left unpadded (the host's own
T5TokenizerOptions option, min_length 1) so that a step costs seconds, not minutes.
"""
from __future__ import annotations

import gc
import importlib
import logging

import pytest

torch = pytest.importorskip("torch")

import family_checkpoints as fc  # noqa: E402
from family_checks import (PROMPT, assert_class_image_is_stock, checkpointing_bytes, digest, flow_loss,  # noqa: E402
                           host_velocity, instance_images, lora_setup, training_data)


def _cb(pack):
    return importlib.import_module(pack.__name__ + ".nodes.comfy_backend")


_LOADED: dict = {}


def _load(name):
    """(files, MODEL, CLIP, VAE) of a family, loaded once per module under inference mode."""
    if name not in _LOADED:
        for other in list(_LOADED):  # one family in memory at a time (0.3.64's are ~0.5 B parameters)
            del _LOADED[other]
        gc.collect()
        try:
            files = fc.ensure_family(name)
        except fc.FamilyUnsupported as e:
            pytest.skip(str(e))
        with torch.inference_mode():
            model, clip, vae = files.load_model(), files.load_clip(), files.load_vae()
        if files.layout.get("hidden") == 3072 and files.clip_type == "flux":
            clip.set_tokenizer_option("t5xxl_min_length", 1)  # see the module docstring
        _LOADED[name] = (files, model, clip, vae)
    return _LOADED[name]


# ------------------------------------------------------------------------------------------- detection

EXPECT = {"flux_dev": ("flux", 1.15), "flux_schnell": ("flux-schnell", 1.0), "sd3": ("sd3", 3.0),
          "sd35": ("sd3", 3.0), "chroma": ("chroma", None), "lumina2": ("lumina2", 6.0)}


@pytest.mark.parametrize("name", ["flux_dev", "sd3"])
def test_family_shift_and_schedule(comfy_host, pack, name):
    import math

    files, model, clip, vae = _load(name)
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    family, host_shift = EXPECT[name]
    assert backend.family == family and backend.prediction_type == "flow"
    schedule = backend.schedule()
    assert schedule.kind == "flow"
    sampling = model.get_model_object("model_sampling")
    # Flux stores μ of e^μ/(e^μ + 1/t − 1): the SD3 shift e^μ; SD3 stores the shift itself.
    expected = math.exp(sampling.shift) if "Flux" in type(sampling).__mro__[1].__name__ else sampling.shift
    assert schedule.shift == pytest.approx(expected) and sampling.shift == pytest.approx(host_shift)
    # the schedule's σ(t) is the host's own: shifting t = 0.3 gives the host's sigma at that timestep
    t = torch.tensor([0.3])
    objective = importlib.import_module(pack.__name__ + ".dreambooth_core.training.objective")
    mult = getattr(sampling, "multiplier", None) or 1.0
    torch.testing.assert_close(objective.shift_sigmas(t, schedule.shift), sampling.sigma(t * mult).float())


def test_other_families_are_refused_naming_them(comfy_host, pack):
    """A Flux Fill (inpainting) model, a flow model whose sampling a node re-patched, and an EDM patch:
    refused at construction, with the family's name and what trains."""
    import comfy.model_patcher
    import comfy.supported_models
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    cb = _cb(pack)
    base = importlib.import_module(pack.__name__ + ".dreambooth_core.backends.base")
    files, model, clip, vae = _load("flux_dev")
    config = dict(model.model.model_config.unet_config, in_channels=96)
    inpaint = comfy.supported_models.FluxInpaint(config)
    with torch.device("meta"):
        inpaint_model = inpaint.get_model({})
    fill = comfy.model_patcher.ModelPatcher(inpaint_model, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(base.UnsupportedModel, match=r"FluxInpaint.*trains SD1\.x, SD2\.x, SDXL, Flux"):
        cb.ComfyBackend(fill, clip, vae)
    # detected as Flux, but with a control image's channels in img_in (Flux Canny / Depth)
    canny = comfy.supported_models.Flux(dict(model.model.model_config.unet_config, in_channels=32))
    with torch.device("meta"):
        canny_model = canny.get_model({})
    control = comfy.model_patcher.ModelPatcher(canny_model, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(base.UnsupportedModel, match="Flux MODEL takes 128 input channels"):
        cb.ComfyBackend(control, clip, vae)
    with torch.inference_mode():
        eps = ModelSamplingDiscrete().patch(model, "eps", False)[0]
    with pytest.raises(base.UnsupportedModel, match="Flux MODEL samples with ModelSamplingDiscrete"):
        cb.ComfyBackend(eps, clip, vae)
    with pytest.raises(ValueError, match="mode 'lora'"):
        cb.ComfyBackend(model, clip, vae, mode="full")
    with pytest.raises(ValueError, match="train_text_encoder"):
        cb.ComfyBackend(model, clip, vae, train_text_encoder=True)


# ------------------------------------------------------------------------------------------- predict

@pytest.mark.parametrize("name", ["flux_dev", "flux_schnell", "sd3", "sd35", "chroma", "lumina2"])
def test_predict_is_the_hosts_velocity(comfy_host, pack, name):
    files, model, clip, vae = _load(name)
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    prompts = [PROMPT, "a dog"]  # two lengths where the encoder does not pad (Chroma, Lumina 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, files.latent_channels, 8, 8, generator=g)
    sigma = torch.tensor([0.35, 0.8])
    with torch.no_grad():
        cond = backend.encode_text(prompts, size=(64, 64))
        assert cond["context"].shape[1] == backend._family.text_cap + 77
        out = backend.predict(x, sigma, cond)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for i, prompt in enumerate(prompts):
        expected = host_velocity(model, clip, prompt, x[i:i + 1], sigma[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], expected, rtol=1e-3, atol=1e-3)
    if name == "flux_dev":  # the guidance the host's extra_conds put in (its default, as kohya trains dev)
        conds = backend._flow_conds(x.to(backend.device), cond, 0)
        assert conds["guidance"].cond.tolist() == [3.5]


def test_predict_goes_through_apply_model_wrappers(comfy_host, pack):
    """A MODEL whose options wrap apply_model (a node's APPLY_MODEL wrapper) is predicted through the
    host's apply_model, the wrapper included: v = (x − denoised)/σ."""
    import comfy.patcher_extension as pe

    files, model, clip, vae = _load("flux_dev")
    calls = []

    def wrapper(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs) * 0.5  # a visible change

    wrapped = model.clone()
    wrapped.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test", wrapper)
    cb = _cb(pack)
    x, sigma = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.5])
    with torch.no_grad():
        plain = cb.ComfyBackend(model, clip, vae)
        w = cb.ComfyBackend(wrapped, clip, vae)
        v_plain = plain.predict(x, sigma, plain.encode_text([PROMPT], size=(64, 64)))
        v_wrapped = w.predict(x, sigma, w.encode_text([PROMPT], size=(64, 64)))
    assert calls
    denoised = x - sigma * v_plain  # the wrapper halves denoised: v' = (x − denoised/2)/σ
    torch.testing.assert_close(v_wrapped, (x - 0.5 * denoised) / sigma, rtol=1e-3, atol=1e-3)


def test_lora_gradient_is_exact_with_gradient_checkpointing_on_and_off(comfy_host, pack):
    """The gradient the trainer gets (frozen Linears pass it on from the weight read again) is the same
    with the blocks recomputed (checkpointing on) or kept (off), and is the derivative of predict: a
    central finite difference along the double block's gradient, which reaches it back through the
    single block's norm, whose saved input the host's in-place `x += ...` would otherwise overwrite
    (that error was ~1e-3 of this derivative; the check allows 3e-4)."""
    files, model, clip, vae = _load("flux_dev")
    cb = _cb(pack)
    backend = cb.ComfyBackend(model, clip, vae)
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.4])
    target = torch.randn(x.shape, generator=g)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            cond = backend.encode_text([PROMPT], size=(64, 64))
            network = lora_setup(pack, backend)
            names = [n for n, a in network.adapters.items() for _ in a.parameters()]
            params = list(network.parameters())

            def loss():
                return ((backend.predict(x, sigma, cond) - target) ** 2).mean()

            grads = {}
            for on in (False, True):
                backend.set_gradient_checkpointing(on)
                grads[on] = torch.autograd.grad(loss(), params)
            backend.set_gradient_checkpointing(False)
            double = [i for i, n in enumerate(names) if "double_blocks" in n]
            norm = sum(float((grads[False][i] ** 2).sum()) for i in double) ** 0.5
            direction = {i: grads[False][i] / norm for i in double}
            eps = 1e-2
            with torch.no_grad():
                for i, d in direction.items():
                    params[i].add_(d, alpha=eps)
                plus = loss()
                for i, d in direction.items():
                    params[i].add_(d, alpha=-2 * eps)
                minus = loss()
                for i, d in direction.items():
                    params[i].add_(d, alpha=eps)
    finally:
        backend.release()
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    numeric = float((plus - minus) / (2 * eps))
    for on in (False, True):
        analytic = sum(float((grads[on][i] * d).sum()) for i, d in direction.items())
        assert analytic == pytest.approx(numeric, rel=3e-4), (on, analytic, numeric)
    assert any(float(grads[False][i].abs().sum()) > 0 for i, n in enumerate(names) if "single_blocks" in n)


def test_gradient_checkpointing_lowers_the_saved_activations_of_a_flow_family(comfy_host, pack):
    """With checkpointing on, Flux's blocks keep only their inputs for backward: the bytes autograd
    holds between forward and backward fall, for the same loss (the same graph, recomputed)."""
    files, model, clip, vae = _load("flux_dev")
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    g = torch.Generator().manual_seed(4)
    x, sigma = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.7])
    try:
        with torch.inference_mode(False), torch.enable_grad():
            cond = backend.encode_text([PROMPT, PROMPT], size=(64, 64))
            network = lora_setup(pack, backend)
            saved = checkpointing_bytes(backend, network, lambda: backend.predict(x, sigma, cond))
    finally:
        backend.release()
    assert saved[True] < 0.25 * saved[False], saved


def test_gradient_checkpointing_lowers_the_saved_activations_of_the_sd_unet(comfy_host, pack, loaded):
    """The same on the SD path (mini SD1.5): checkpointing the layers of the host's UNet blocks (the
    host runs them through forward_timestep_embed, not the blocks' forward) really applies."""
    model, clip, vae = loaded
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    g = torch.Generator().manual_seed(5)
    noisy, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([400])
    try:
        with torch.inference_mode(False), torch.enable_grad():
            cond = backend.encode_text([PROMPT], size=(128, 128))
            network = lora_setup(pack, backend, std=0.02)
            saved = checkpointing_bytes(backend, network, lambda: backend.predict(noisy, t, cond))
    finally:
        backend.release()
    assert saved[True] < 0.25 * saved[False], saved


@pytest.mark.parametrize("name", ["flux_dev", "flux_schnell", "sd3", "sd35", "chroma", "lumina2"])
def test_lora_names_map_in_the_stock_loader_to_the_weights_they_train(comfy_host, pack, name):
    """Every LoRA target's kohya name is a key of the stock loader's map (comfy.lora.model_lora_keys_unet)
    that patches exactly the weight the adapter trains; only attention and MLP Linears of the blocks."""
    import re

    import comfy.lora

    files, model, clip, vae = _load(name)
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    targets = backend.lora_targets(True, False)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert targets and all(key_map.get(n) == backend._target_keys[n][1] for n in targets)
    parts = {re.sub(r"_\d+_", "_N_", n) for n in targets}
    expect = {"flux_dev": "lora_unet_double_blocks_N_img_attn_qkv", "sd3": "lora_unet_joint_blocks_N_x_block_mlp_fc2",
              "lumina2": "lora_unet_layers_N_feed_forward_w3", "chroma": "lora_unet_single_blocks_N_linear2"}
    assert expect.get(name, next(iter(parts))) in parts
    assert not any(re.search(r"mod|embed|final|norm", n) for n in targets), sorted(parts)

    # The identifier is checked in the CLIP tokenizers where the model has some (T5 splits "sks"), else
    # in its T5 (Chroma) or SentencePiece (Lumina 2) tokenizer.
    tokens = importlib.import_module(pack.__name__ + ".dreambooth_core.dataset.tokens")
    tokenizers = _cb(pack).clip_tokenizers(clip)
    check = tokens.check_token(tokenizers, "sks")
    kinds = {type(t).__name__ for t in tokenizers}
    if name in ("chroma", "lumina2"):
        expected = {"chroma": "T5Tokenizer", "lumina2": "_SentencePieceView"}[name]  # T5Tokenizer(Fast)
        assert len(kinds) == 1 and next(iter(kinds)).startswith(expected), kinds
        # "sks" splits there: suggestions come from that tokenizer's own vocabulary and pass the check
        picks = tokens.suggest_tokens(tokenizers, 3)
        assert not check.single and len(picks) == 3 and repr(picks[0]) in check.message, (picks, check.message)
        assert all(tokens.check_token(tokenizers, w).single for w in picks), picks
    else:
        assert all("CLIP" in k for k in kinds) and check.single, (kinds, check.message)


# ------------------------------------------------------------------------------------------- training

TRAINED = {"flux_dev": ("lora_unet_double_blocks_0_img_attn_qkv", "flux1", "flux-1-dev/lora"),
           "flux_schnell": ("lora_unet_double_blocks_0_img_attn_qkv", "flux1", "flux-1-schnell/lora"),
           "sd3": ("lora_unet_joint_blocks_0_x_block_attn_qkv", "sd3", "stable-diffusion-3-medium/lora"),
           "sd35": ("lora_unet_joint_blocks_0_x_block_attn_qkv", "sd3", "stable-diffusion-3-medium/lora"),
           "lumina2": ("lora_unet_layers_0_attention_qkv", "lumina2", "lumina-2/lora"),
           "chroma": ("lora_unet_double_blocks_0_img_attn_qkv", "chroma", "chroma/lora")}
# 0.3.64's Flux is 3072 wide: keep the file's picture short; Chroma's every forward runs its 5120-wide
# approximator on 344 rows (~3 s a sample on one thread): the picture is the first photo
THUMBNAIL_STEPS = {"chroma": 0}
CHECKPOINTED = ("flux_dev", "lumina2")  # trained with gradient checkpointing on; the others with it off
LEARNING_RATE = {"sd3": 1e-2, "chroma": 1e-3}  # Chroma: 3e-3 raises the held-out loss in 2 steps


@pytest.mark.parametrize("name,steps", [("flux_dev", 3), ("flux_schnell", 3), ("sd3", 4), ("sd35", 4), ("lumina2", 2),
                                        ("chroma", 2)])
def test_lora_training_lowers_flow_loss_and_loads_in_the_stock_loader(comfy_host, pack, name, steps, tmp_path, caplog):
    import comfy.utils
    import nodes as host_nodes

    files, model, clip, vae = _load(name)
    if name == "flux_schnell" and files.layout.get("hidden") == 3072:
        pytest.skip("0.3.64 builds Flux 3072 wide: schnell's training path is dev's without the guidance input, "
                    "which flux_dev trains here (~4 min on 2 cores); schnell trains on 0.33")
    cb = _cb(pack)
    core = lambda m: importlib.import_module(pack.__name__ + ".dreambooth_core." + m)  # noqa: E731
    config_mod, trainer_mod, base_mod = core("config"), core("training.trainer"), core("backends.base")
    before = digest(model.model)

    backend = cb.ComfyBackend(model, clip, vae)
    instance, classes, latents, cond = training_data(backend, base_mod)
    untrained = flow_loss(backend, latents, cond)

    config = config_mod.TrainConfig(token="sks", class_noun="dog", resolution=64, prior=True, prior_weight=1.0,
                                    rank=4, steps=steps, learning_rate=LEARNING_RATE.get(name, 3e-3), batch_size=1,
                                    seed=0, output_dir=str(tmp_path), save_name=f"flow_{name}", save_precision="fp32",
                                    max_grad_norm=0.0, thumbnail_steps=THUMBNAIL_STEPS.get(name, 2),
                                    gradient_checkpointing=name in CHECKPOINTED)
    state = {}

    def on_step(info):
        state.setdefault("checkpointing", backend._flow_checkpointing)  # the user's choice reached the blocks
        if "no_wrappers" not in state:  # while training: no weight copies of the transformer
            dm = backend.model.model.diffusion_model
            linears = [m for m in dm.modules() if isinstance(m, torch.nn.Linear)]
            state["no_wrappers"] = (not backend.model.weight_wrapper_patches
                                    and all(not getattr(m, "weight_function", []) for m in linears))

    try:
        with torch.inference_mode(False), torch.enable_grad():
            result = trainer_mod.train(backend, config, instance, classes,
                                       callbacks=trainer_mod.Callbacks(on_step=on_step))
    finally:
        backend.release()
    # The trained MODEL the node hands on (the deltas as weight wrappers), predicted the same way.
    trained = flow_loss(cb.ComfyBackend(backend.result()[0], clip, vae), latents, cond)
    assert result.status == "completed" and result.lora_path is not None
    assert state["checkpointing"] == (name in CHECKPOINTED) and not backend._flow_checkpointing
    assert state["no_wrappers"], "a frozen Linear was read through a weight wrapper (a full copy per forward)"
    model_bytes = sum(p.nelement() * p.element_size() for p in model.model.diffusion_model.parameters())
    assert backend.frozen_copied_bytes < 0.01 * model_bytes, (backend.frozen_copied_bytes, model_bytes)
    assert trained < untrained, (untrained, trained)
    dm = model.model.diffusion_model
    assert all("forward" not in vars(m) for m in dm.modules()), "a forward patch was left on the shared model"
    assert all(not p.requires_grad or p.grad is None for p in model.model.parameters())

    # The file: kohya keys of the family, its metadata, every key used by the stock LoraLoader.
    lora = comfy.utils.load_torch_file(str(result.lora_path))
    names = {k.split(".")[0] for k in lora}
    first, version, arch = TRAINED[name]
    assert first in names and all(n.startswith("lora_unet_") for n in names)
    assert not any("mod" in n for n in names), "modulation Linears carry no LoRA"
    from safetensors import safe_open

    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == (version, arch)

    loras = comfy_host.get_folder_paths("loras")[0]
    dest = f"{loras}/flow_{name}.safetensors"
    import shutil

    shutil.copyfile(result.lora_path, dest)
    caplog.set_level(logging.WARNING)
    x, sigma = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([0.6])
    with torch.inference_mode():
        lm, lc = host_nodes.LoraLoader().load_lora(model, clip, f"flow_{name}.safetensors", 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(lm.patches) == len(names), "every key patches one weight"
    v_base = host_velocity(model, clip, PROMPT, x, sigma)
    v_lora = host_velocity(lm, lc, PROMPT, x, sigma)
    v_result = host_velocity(backend.result()[0], clip, PROMPT, x, sigma)  # the trained MODEL of the node
    assert not torch.equal(v_base, v_lora)
    torch.testing.assert_close(v_lora, v_result, rtol=1e-3, atol=1e-3)
    assert digest(model.model) == before, "training changed the shared base MODEL's weights"


@pytest.fixture(scope="module")
def subject_folder(comfy_host):
    folder = comfy_host.base / "input" / "flow_subject"
    folder.mkdir(exist_ok=True)
    for i, im in enumerate(instance_images()):
        im.save(folder / f"{i}.png")
    return "flow_subject"


def test_the_nodes_train_sd3(comfy_host, pack, subject_folder):
    """Dataset -> Class Images -> Train, as the executor calls them (inference mode): the identifier is
    checked in SD3's CLIP tokenizers (T5 splits 'sks'), the LoRA lands in models/loras with SD3's keys,
    the trained MODEL differs from the base and the base stays bit-identical."""
    files, model, clip, vae = _load("sd3")
    n = {k: v() for k, v in pack.NODE_CLASS_MAPPINGS.items()}
    before = digest(model.model)
    with torch.inference_mode():
        ds = n["DreamBoothDataset"].prepare(clip, subject_folder, "sks", "dog", 64, "center", False)["result"][0]
        ci = n["DreamBoothClassImages"].generate(model, clip, vae, "a photo of a dog", 2, 2, 1.0, "euler", "simple",
                                                 0, 64)["result"][0]
        out = n["DreamBoothTrain"].train(model, clip, vae, ds, "lora", 4, 0.0, False, 2, 1e-2, 1.0, 1, 0,
                                         "flow_nodes_sd3", False, 0, class_images=ci)["result"]
    trained_model, _, lora_path, _, lora_model = out
    assert lora_path.endswith("flow_nodes_sd3.safetensors")
    assert lora_model and all(k.startswith("lora_unet_joint_blocks_") for k in lora_model)
    x, sigma = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7)), torch.tensor([0.5])
    assert not torch.equal(host_velocity(trained_model, clip, PROMPT, x, sigma),
                           host_velocity(model, clip, PROMPT, x, sigma))
    assert digest(model.model) == before


@pytest.mark.parametrize("name", ["sd3", "flux_dev"])
def test_class_images_are_the_stock_ksampler_images(comfy_host, pack, name):
    """A class image of a flow family is the PNG a stock graph makes with that seed: CLIPTextEncode, an
    empty latent of the family's 16 channels (what EmptySD3LatentImage gives), KSampler, VAEDecode."""
    files, model, clip, vae = _load(name)
    assert_class_image_is_stock(pack, model, clip, vae)


def test_the_sample_grid_node_samples_a_flow_family(comfy_host, pack):
    """DreamBooth Sample Grid on SD3: one row per prompt, one column per seed, each image the backend's."""
    files, model, clip, vae = _load("sd3")
    grid_node = pack.NODE_CLASS_MAPPINGS["DreamBoothSampleGrid"]()
    with torch.inference_mode():
        grid, images = grid_node.sample(model, clip, vae, "sks", "dog", "custom",
                                        "a photo of {token} {class}\na {token} {class} on the moon", "0, 1", 2, 3.0,
                                        "euler", "simple", 64)
    assert images.shape == (4, 64, 64, 3) and grid.shape[0] == 1 and grid.shape[1] > 128
    assert not torch.equal(images[0], images[2]), "the two prompts give different images"
