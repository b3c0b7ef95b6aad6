"""The comfy backend on the flow families whose sizes the host hard-codes in its detection: Z-Image
(ComfyUI 0.33 only), HiDream and Omnigen2, in-process on the host's own objects, with tiny checkpoints in each
family's real layout that the host builds small under a test-only wrapper of its detection
(family_checkpoints_big.py: the scaffolding, documented there).

Checked per family, as test_flow_families_more.py checks Qwen-Image, AuraFlow and HunyuanImage 2.1:
  - the backend's velocity is the host's own (its encoding, `extra_conds`, `apply_model`);
  - a few LoRA steps of the core trainer with prior preservation (class images from `generate`) lower
    the held-out flow loss of the identifier prompt; the file carries `lora_unet_` keys of the blocks'
    attention and MLP Linears (HiDream's MoE experts too; no modulation, no text projection, nothing of
    Omnigen2's reference-image refiner) and the family's metadata; the stock LoraLoader uses every key and
    changes the model's output as the trained MODEL does; the base MODEL stays bit-identical; the identifier
    is checked in the tokenizers that read the prompt (HiDream's CLIP-L and CLIP-G, the others' Qwen);
    HiDream's Llama hidden states reach the model as the host's conditioning carries them;
  - a class image equals the stock KSampler graph's image with that seed.
HiDream's T5 must be 24 blocks with 10240-wide (0.33) or 4096-wide (0.3.64) feed-forwards for the host to
take it for T5-XXL, and pads every prompt to 128 tokens (~0.7 s a prompt here, a dozen prompts a run): as
AuraFlow's in test_flow_families_more.py, its padding is left off through the host's own tokenizer option
(`t5xxl_min_length` 1). Its Llama keeps the host's 128 tokens (cheap), which make its hidden states one shape.
"""
from __future__ import annotations

import gc
import importlib
import logging
import re
import shutil

import pytest

torch = pytest.importorskip("torch")

import family_checkpoints as fc  # noqa: E402
import family_checkpoints_big as fb  # noqa: E402
from test_flow_families import (_assert_class_image_is_stock, _digest, _flow_loss, _host_velocity,  # noqa: E402
                                _training_data)

PROMPT = "a photo of sks dog"
# family fixture -> (Backend.family, a LoRA name it must have, metadata version, architecture, host shift)
FAMILIES = {"zimage": ("z-image", "lora_unet_layers_0_attention_qkv", "z_image", "z-image/lora", 3.0),
            "hidream": ("hidream", "lora_unet_double_stream_blocks_0_block_attn1_to_q", "hidream", "hidream/lora",
                        1.0),
            "omnigen2": ("omnigen2", "lora_unet_layers_0_attn_to_q", "omnigen2", "omnigen2/lora", 2.6)}
TOKENIZER = {"zimage": ["Qwen2Tokenizer"], "hidream": ["CLIPTokenizer", "CLIPTokenizer"],
             "omnigen2": ["Qwen2Tokenizer"]}
# the fixtures are 64 (Z-Image 256) wide with a block or two: each step moves the held-out loss little
STEPS = {"zimage": 3, "hidream": 2, "omnigen2": 6}
LEARNING_RATE = {"zimage": 3e-2, "hidream": 3e-3, "omnigen2": 3e-2}
CHECKPOINTED = ("zimage", "hidream")  # trained with gradient checkpointing on (the blocks recomputed); Omnigen2 off
_LOADED: dict = {}


def _cb(pack):
    return importlib.import_module(pack.__name__ + ".nodes.comfy_backend")


def _load(name):
    """(files, MODEL, CLIP, VAE) of a family, loaded once per module under inference mode."""
    if name not in _LOADED:
        try:
            files = fb.ensure_family(name)
        except fc.FamilyUnsupported as e:
            pytest.skip(str(e))
        _LOADED.clear()
        gc.collect()
        with torch.inference_mode():
            model, clip, vae = fb.load(files)
        if files.model_class == "HiDream":
            clip.set_tokenizer_option("t5xxl_min_length", 1)  # see the module docstring
        _LOADED[name] = (files, model, clip, vae)
    return _LOADED[name]


@pytest.fixture(scope="module", params=list(FAMILIES))
def name(request):
    """The family fixture's name; module-scoped, so pytest runs a family's tests together (one load each)."""
    return request.param


def test_predict_is_the_hosts_velocity(comfy_host, pack, name):
    import math

    files, model, clip, vae = _load(name)
    assert type(model.model.model_config).__name__ == files.model_class  # the host's own detection
    unet_config = model.model.model_config.unet_config
    assert {k: unet_config.get(k) for k in files.expect} == files.expect
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    family, _, _, _, shift = FAMILIES[name]
    sampling = model.get_model_object("model_sampling")
    assert backend.family == family and backend.prediction_type == "flow"
    flux_kind = "Flux" in type(sampling).__mro__[1].__name__  # stores μ = log s (families.flow_shift)
    assert backend.schedule().shift == pytest.approx(math.exp(sampling.shift) if flux_kind else sampling.shift)
    assert sampling.shift == pytest.approx(shift)
    prompts = [PROMPT, "a dog"]
    x = torch.randn(2, files.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.35, 0.8])
    with torch.no_grad():
        out = backend.predict(x, sigma, backend.encode_text(prompts, size=(64, 64)))
    assert out.shape == x.shape and out.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        expected = _host_velocity(model, clip, prompt, x[i:i + 1], sigma[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], expected.reshape(1, *x.shape[1:]), rtol=1e-3, atol=1e-3)
    if name == "hidream":
        # the Llama hidden states are one shape per prompt only as the host pads them (to 128 tokens): a CLIP
        # whose padding a node turned off is refused, naming them, rather than trained on mismatched batches
        unpadded = clip.clone()
        unpadded.set_tokenizer_option("llama_min_length", 1)
        base = importlib.import_module(pack.__name__ + ".dreambooth_core.backends.base")
        with pytest.raises(base.UnsupportedModel, match="conditioning_llama3"), torch.no_grad():
            _cb(pack).ComfyBackend(model, unpadded, vae).encode_text(prompts, size=(64, 64))


def test_lora_training_lowers_flow_loss_and_loads_in_the_stock_loader(comfy_host, pack, name, tmp_path, caplog):
    import comfy.lora
    import comfy.utils
    import nodes as host_nodes
    from safetensors import safe_open

    files, model, clip, vae = _load(name)
    family, first, version, arch, _ = FAMILIES[name]
    cb = _cb(pack)
    core = lambda m: importlib.import_module(pack.__name__ + ".dreambooth_core." + m)  # noqa: E731
    config_mod, trainer_mod, base_mod = core("config"), core("training.trainer"), core("backends.base")
    before = _digest(model.model)

    backend = cb.ComfyBackend(model, clip, vae)
    targets = backend.lora_targets(True, False)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert first in targets and all(key_map.get(n) == backend._target_keys[n][1] for n in targets)
    assert not any(re.search(r"mod|embed|final|norm|ref_image|caption_projection", n) for n in targets), sorted(targets)
    # the identifier is checked in the tokenizers that read the prompt: HiDream's CLIP-L and CLIP-G (where it
    # has CLIP, as Flux and SD3), Z-Image's and Omnigen2's Qwen tokenizer, which splits the usual identifiers:
    # there the suggestions come from its own vocabulary and pass the check
    assert [type(t).__name__ for t in backend.tokenizers()] == TOKENIZER[name]
    tokens = core("dataset.tokens")
    check = tokens.check_token(backend.tokenizers(), "sks")
    if name == "hidream":
        assert check.single, check.message
    else:
        picks = tokens.suggest_tokens(backend.tokenizers(), 3)
        assert not check.single and len(picks) == 3 and repr(picks[0]) in check.message, (picks, check.message)
        assert all(tokens.check_token(backend.tokenizers(), w).single for w in picks), picks

    instance, classes, latents, cond = _training_data(backend, base_mod)
    side = 64 // backend.latent_factor
    assert latents.shape == (3, files.latent_channels, side, side)
    untrained = _flow_loss(backend, latents, cond)

    config = config_mod.TrainConfig(token="sks", class_noun="dog", resolution=64, prior=True, prior_weight=1.0,
                                    rank=4, steps=STEPS.get(name, 2), learning_rate=LEARNING_RATE.get(name, 3e-3),
                                    batch_size=1, seed=0,
                                    output_dir=str(tmp_path), save_name=f"flow_{name}", save_precision="fp32",
                                    max_grad_norm=0.0, thumbnail_steps=0,
                                    gradient_checkpointing=name in CHECKPOINTED)
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

    shutil.copyfile(result.lora_path, f"{comfy_host.get_folder_paths('loras')[0]}/flow_{name}.safetensors")
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        lm, lc = host_nodes.LoraLoader().load_lora(model, clip, f"flow_{name}.safetensors", 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(lm.patches) == len(names), "every key patches one weight"
    x = torch.randn(1, files.latent_channels, side, side, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.6])
    v_base = _host_velocity(model, clip, PROMPT, x, sigma)
    v_lora = _host_velocity(lm, lc, PROMPT, x, sigma)
    assert not torch.equal(v_base, v_lora)
    torch.testing.assert_close(v_lora, _host_velocity(backend.result()[0], clip, PROMPT, x, sigma),
                               rtol=1e-3, atol=1e-3)
    assert _digest(model.model) == before, "training changed the shared base MODEL's weights"


def test_class_images_are_the_stock_ksampler_images(comfy_host, pack, name):
    """A class image is the PNG of a stock graph with that seed: CLIPTextEncode, an empty 16-channel latent,
    KSampler, VAEDecode."""
    files, model, clip, vae = _load(name)
    _assert_class_image_is_stock(pack, model, clip, vae)
