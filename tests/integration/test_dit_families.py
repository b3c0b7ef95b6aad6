"""The comfy backend on the discrete-schedule transformers: PixArt α, PixArt Σ (ε) and Hunyuan-DiT v1.1/1.2 (v)
(families.py: the transformer path, its blocks and LoRA by the generic rule, on the discrete schedule of the
model's own sigmas), in-process on the host's own objects, with tiny checkpoints in each family's real layout
(family_checkpoints_dit.py).

Checked per family, as test_flow_families_more.py checks the flow ones:
  - the backend's ε / v at integer timesteps is the host's own (its encoding, with Hunyuan-DiT's mT5 beside
    its BERT, `extra_conds`, `apply_model`, whose learned-σ channels the diffusion model drops); on PixArt Σ
    also through a MODEL whose options wrap `apply_model` (then ε, or v behind the stock ModelSamplingDiscrete
    node, comes from its denoised output), and a MODEL re-patched to EDM sampling is refused by name;
  - a few LoRA steps of the core trainer with prior preservation (class images from `generate`) lower the
    held-out ε / v loss of the identifier prompt; the file carries `lora_unet_` keys of the blocks' attention and
    MLP Linears and the family's metadata; the stock LoraLoader uses every key and changes the model's
    output as the trained MODEL does; the base MODEL stays bit-identical; the identifier is checked in the
    tokenizers that read the prompt;
  - a class image equals the stock KSampler graph's image with that seed.
Both hosts hard-code PixArt's width (1152) and caption width (4096): one block is ~37 M parameters beside a
2-block, 4096-wide T5 (135 M, mostly its vocabulary); its images are at least 272 px, so the VAE is TAESD.
Hunyuan-DiT is 256 wide (45 M with its hard-coded text MLP and pooler). The whole file, cache warm, took 30 s
(0.33) and 36 s (0.3.64) on 2 cores shared with other jobs (load ~2.5).
"""
from __future__ import annotations

import gc
import importlib
import logging
import shutil

import pytest

torch = pytest.importorskip("torch")

import family_checkpoints as fc  # noqa: E402
import family_checkpoints_dit as fd  # noqa: E402
from test_flow_families import _assert_class_image_is_stock, _digest, _host_velocity, _training_data  # noqa: E402

PROMPT = "a photo of sks dog"
# family fixture -> (Backend.family, a LoRA name it must have, metadata version, architecture)
FAMILIES = {"pixart_alpha": ("pixart-alpha", "lora_unet_blocks_0_cross_attn_kv_linear", "pixart_alpha",
                             "pixart-alpha/lora"),
            "pixart_sigma": ("pixart-sigma", "lora_unet_blocks_0_cross_attn_kv_linear", "pixart_sigma",
                             "pixart-sigma/lora"),
            "hunyuan_dit": ("hunyuan-dit", "lora_unet_blocks_0_attn2_kv_proj", "hunyuan_dit", "hunyuan-dit/lora")}
PREDICTION = {"hunyuan_dit": "v_prediction"}  # PixArt: epsilon
# each block's attention, cross-attention and MLP Linears (no t_block / default_modulation / embedder / final layer)
BLOCK_LINEARS = {"pixart": ("attn_qkv", "attn_proj", "cross_attn_q_linear", "cross_attn_kv_linear", "cross_attn_proj",
                            "mlp_fc1", "mlp_fc2"),
                 "hunyuan": ("attn1_Wqkv", "attn1_out_proj", "attn2_q_proj", "attn2_kv_proj", "attn2_out_proj",
                             "mlp_fc1", "mlp_fc2")}
TOKENIZERS = {"pixart": ["T5Tokenizer"], "hunyuan": ["BertTokenizer", "_SentencePieceView"]}
# PixArt's position embedding needs a mean latent side of 33 or more (family_checkpoints_dit.py): the
# smallest square it trains on is 272 px; predictions and the class image use the cheapest shape it
# takes, 2 x 64 latents (16 x 512 px: 32 tokens)
SIZE = 272
LATENT = (2, 64)
TRAIN_SIZE = {"hunyuan_dit": 64}  # Hunyuan-DiT's RoPE takes any size
CHECKPOINTED = ("pixart_sigma",)  # trained with gradient checkpointing on (the blocks recomputed); α off
_LOADED: dict = {}


def _cb(pack):
    return importlib.import_module(pack.__name__ + ".nodes.comfy_backend")


def _load(name):
    """(files, MODEL, CLIP, VAE) of a family, loaded once per module under inference mode."""
    if name not in _LOADED:
        _LOADED.clear()
        gc.collect()
        try:
            files = fd.ensure_family(name)
        except fc.FamilyUnsupported as e:
            pytest.skip(str(e))
        with torch.inference_mode():
            model, clip, vae = fd.load(files)
        _LOADED[name] = (files, model, clip, vae)
    return _LOADED[name]


@pytest.fixture(scope="module", params=list(FAMILIES))
def name(request):
    """The family fixture's name; module-scoped, so pytest runs a family's tests together (one load each)."""
    return request.param


def _host_eps(model, clip, prompt, noisy, t):
    """The model's raw output (ε or v) from the host's own path at the core's (VP-scaled) input and integer
    timesteps: the host's input is x = x0 + σε = noisy·√(1+σ²); for EPS sampling ε = (x − denoised)/σ, for
    V_PREDICTION (σ_data 1) denoised = x/(σ²+1) − v·σ/√(σ²+1)."""
    import comfy.model_sampling

    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigmas[t].float()
    s = sigma.view(-1, 1, 1, 1)
    x = noisy * (1 + s ** 2).sqrt()
    eps = _host_velocity(model, clip, prompt, x, sigma)
    if not isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return eps
    denoised = x - eps * s
    return (x / (s ** 2 + 1) - denoised) * (s ** 2 + 1).sqrt() / s


def _eps_loss(backend, latents, cond, seed=1234):
    """The mean ε (or v) loss at fixed held-out noise and timesteps (not drawn by any training step)."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([250, 500, 750])[: latents.shape[0]]
    batch = backend.schedule().noised(latents, noise, t)
    with torch.no_grad():
        eps = backend.predict(batch.noisy, t, cond)
    return float(((eps - batch.target) ** 2).mean())


def test_predict_is_the_hosts_eps(comfy_host, pack, name):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    files, model, clip, vae = _load(name)
    assert type(model.model.model_config).__name__ == files.model_class  # the host's own detection
    unet_config = model.model.model_config.unet_config
    assert {k: unet_config.get(k) for k in files.expect} == files.expect
    cb = _cb(pack)
    backend = cb.ComfyBackend(model, clip, vae)
    assert backend.family == FAMILIES[name][0] and backend.prediction_type == PREDICTION.get(name, "epsilon")
    schedule = backend.schedule()
    sigmas = model.get_model_object("model_sampling").sigmas.float()
    assert schedule.kind == "discrete" and len(schedule.alphas_cumprod) == 1000
    torch.testing.assert_close(schedule.alphas_cumprod, 1 / (1 + sigmas ** 2))
    assert model.model.diffusion_model.out_channels == 8  # learned σ: the host's forward returns the 4 ε/v ones

    prompts = [PROMPT, "a dog"]  # different text lengths: a forward each
    x = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 800])
    size = (LATENT[0] * 8, LATENT[1] * 8)
    with torch.no_grad():
        out = backend.predict(x, t, backend.encode_text(prompts, size=size))
    assert out.shape == x.shape and out.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(out[i:i + 1], _host_eps(model, clip, prompt, x[i:i + 1], t[i:i + 1]),
                                   rtol=1e-3, atol=1e-3)

    if name != "pixart_sigma":
        return
    # a node that re-patches its sampling to a continuous EDM schedule: refused up front, by the family's name
    base = importlib.import_module(pack.__name__ + ".dreambooth_core.backends.base")
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    with torch.inference_mode():
        edm = ModelSamplingContinuousEDM().patch(model, "eps", 120.0, 0.002)[0]
    with pytest.raises(base.UnsupportedModel, match=r"PixArtSigma MODEL samples with .*own discrete schedule"):
        cb.ComfyBackend(edm, clip, vae)
    # a MODEL whose options wrap apply_model: its raw output from the denoised one, ε and (behind the stock
    # ModelSamplingDiscrete node) v, equal to the direct path's (backend code, checked on one family)
    for sampling in ("eps", "v_prediction"):
        with torch.inference_mode():
            patched = ModelSamplingDiscrete().patch(model, sampling, False)[0]
        wrapped = patched.clone()
        wrapped.set_model_unet_function_wrapper(lambda f, a: f(a["input"], a["timestep"], **a["c"]))
        direct, through = cb.ComfyBackend(patched, clip, vae), cb.ComfyBackend(wrapped, clip, vae)
        assert direct.prediction_type == ("epsilon" if sampling == "eps" else "v_prediction")
        cond = direct.encode_text(prompts[:1], size=size)
        with torch.no_grad():
            torch.testing.assert_close(through.predict(x[:1], t[:1], cond), direct.predict(x[:1], t[:1], cond),
                                       rtol=1e-3, atol=1e-3)


def test_lora_training_lowers_eps_loss_and_loads_in_the_stock_loader(comfy_host, pack, name, tmp_path, caplog):
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
    kind = name.split("_")[0]
    depth = files.layout["depth"]
    assert set(targets) == {f"lora_unet_blocks_{i}_{n}" for i in range(depth) for n in BLOCK_LINEARS[kind]}

    # the identifier is checked in the tokenizers that read the prompt (PixArt's T5; Hunyuan-DiT's BERT and
    # mT5), which split "sks"; PixArt's suggestions are single pieces (the Hunyuan-DiT fixture's mT5 reads a
    # 32000-piece stand-in vocabulary: no suggestion is checked there)
    tokens = core("dataset.tokens")
    assert [type(t).__name__.replace("Fast", "") for t in backend.tokenizers()] == TOKENIZERS[kind]
    assert not tokens.check_token(backend.tokenizers(), "sks").single
    if kind == "pixart":
        picks = tokens.suggest_tokens(backend.tokenizers(), 2)
        assert len(picks) == 2 and all(tokens.check_token(backend.tokenizers(), w).single for w in picks), picks

    size = TRAIN_SIZE.get(name, SIZE)
    instance, classes, latents, cond = _training_data(backend, base_mod, size=size, n=2)
    assert latents.shape == (2, 4, size // 8, size // 8)
    untrained = _eps_loss(backend, latents, cond)

    config = config_mod.TrainConfig(token="sks", class_noun="dog", resolution=size, prior=True, prior_weight=1.0,
                                    rank=4, steps=2, learning_rate=3e-3, batch_size=1, seed=0,
                                    output_dir=str(tmp_path), save_name=f"dit_{name}", save_precision="fp32",
                                    max_grad_norm=0.0, thumbnail_steps=0,
                                    gradient_checkpointing=name in CHECKPOINTED)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            result = trainer_mod.train(backend, config, instance, classes)
    finally:
        backend.release()
    trained = _eps_loss(cb.ComfyBackend(backend.result()[0], clip, vae), latents, cond)
    assert result.status == "completed" and trained < untrained, (untrained, trained)
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())

    lora = comfy.utils.load_torch_file(str(result.lora_path))
    names = {k.split(".")[0] for k in lora}
    assert names == set(targets)
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == (version, arch)
    assert meta["dreambooth_base_family"] == family
    assert meta["ss_v_parameterization"] == str(PREDICTION.get(name) == "v_prediction")

    shutil.copyfile(result.lora_path, f"{comfy_host.get_folder_paths('loras')[0]}/dit_{name}.safetensors")
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        lm, lc = host_nodes.LoraLoader().load_lora(model, clip, f"dit_{name}.safetensors", 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(lm.patches) == len(names), "every key patches one weight"
    x = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([600])
    eps_base = _host_eps(model, clip, PROMPT, x, t)
    eps_lora = _host_eps(lm, lc, PROMPT, x, t)
    assert not torch.equal(eps_base, eps_lora)
    torch.testing.assert_close(eps_lora, _host_eps(backend.result()[0], clip, PROMPT, x, t), rtol=1e-3, atol=1e-3)
    assert _digest(model.model) == before, "training changed the shared base MODEL's weights"


def test_class_images_are_the_stock_ksampler_images(comfy_host, pack, name):
    """A class image (512 x 16) is the PNG of a stock graph with that seed: CLIPTextEncode, an empty latent (4
    channels, as KSampler makes it of the 16-channel one), KSampler, VAEDecode."""
    files, model, clip, vae = _load(name)
    _assert_class_image_is_stock(pack, model, clip, vae, width=LATENT[1] * 8, height=LATENT[0] * 8)
