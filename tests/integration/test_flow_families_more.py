"""The comfy backend on the flow families that train through the generic rule (families.py: the blocks
are the transformer's block lists, the LoRA their Linears but the modulation): Qwen-Image, AuraFlow and
HunyuanImage 2.1, in-process on the host's own objects, with tiny checkpoints in each family's real
layout (family_checkpoints_llm.py).

Checked per family, as test_flow_families.py checks the others:
  - the backend's velocity is the host's own (its encoding, `extra_conds`, `apply_model`);
  - a few LoRA steps of the core trainer with prior preservation (class images from `generate`) lower
    the held-out flow loss of the identifier prompt; the file carries `lora_unet_` keys of the blocks'
    attention and MLP Linears (no modulation) and the family's metadata; the stock LoraLoader uses every
    key and changes the model's output as the trained MODEL does; the base MODEL stays bit-identical;
  - a class image equals the stock KSampler graph's image with that seed;
  - the families still refused are refused up front, named.
The hosts hard-code both transformers' width (3072): Qwen-Image's smallest model is ~380 M parameters
(one block) plus a 545 M-parameter text-encoder embedding, AuraFlow's ~510 M (one double + one single
layer), so each trains 2 steps (~5 s a step on one CPU thread) and only Qwen-Image with gradient
checkpointing on. AuraFlow's Pile-T5 pads every prompt to 256 tokens; here it is left unpadded through
the host's own tokenizer option (`pile_t5xl_min_length` 1), so a step costs seconds, not a minute.
HunyuanImage 2.1's transformer is 128 wide (the host reads its width) beside its 0.4 B-parameter VAE.
The whole file, fixtures built on a cold cache, took 76 s (0.3.64) and 84 s (0.33) on 2 cores shared with
other jobs (load ~2.5; at load 5-7, 140 s); with the cache warm, 60-75 s.
"""
from __future__ import annotations

import gc
import importlib
import logging
import re
import shutil
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

import family_checkpoints as fc  # noqa: E402
import family_checkpoints_llm as fl  # noqa: E402
from test_flow_families import (_assert_class_image_is_stock, _digest, _flow_loss, _host_velocity,  # noqa: E402
                                _training_data)

PROMPT = "a photo of sks dog"
# family fixture -> (Backend.family, a LoRA name it must have, metadata version, architecture, host shift)
FAMILIES = {"auraflow": ("auraflow", "lora_unet_single_layers_0_mlp_c_proj", "auraflow", "auraflow/lora", 1.73),
            "hunyuan_image21": ("hunyuan-image", "lora_unet_double_blocks_0_img_attn_qkv", "hunyuan_image_2.1",
                                "hunyuan-image-2.1/lora", 5.0),
            "qwen_image": ("qwen-image", "lora_unet_transformer_blocks_0_attn_to_q", "qwen_image",
                           "Qwen-Image/lora", 1.15)}

TOKENIZER = {"auraflow": "_SentencePieceView", "hunyuan_image21": "Qwen2Tokenizer", "qwen_image": "Qwen2Tokenizer"}
# HunyuanImage 2.1's fixture is 128 wide (the host reads its width) and its 32x latents are 2x2 at 64 px:
# cheap steps, each moving the held-out loss little
STEPS = {"hunyuan_image21": 6}
LEARNING_RATE = {"hunyuan_image21": 1e-2}
CHECKPOINTED = ("qwen_image",)  # trained with gradient checkpointing on (the blocks recomputed); AuraFlow off
_LOADED: dict = {}


def _cb(pack):
    return importlib.import_module(pack.__name__ + ".nodes.comfy_backend")


def _load(name):
    """(files, MODEL, CLIP, VAE) of a family, loaded once per module under inference mode."""
    if name not in _LOADED:
        _LOADED.clear()
        gc.collect()
        try:
            files = fl.ensure_family(name)
        except fc.FamilyUnsupported as e:
            pytest.skip(str(e))
        with torch.inference_mode():
            model, clip, vae = fl.load(files)
        if files.model_class == "AuraFlow":
            clip.set_tokenizer_option("pile_t5xl_min_length", 1)  # see the module docstring
        _LOADED[name] = (files, model, clip, vae)
    return _LOADED[name]


@pytest.fixture(scope="module", params=list(FAMILIES))
def name(request):
    """The family fixture's name; module-scoped, so pytest runs a family's tests together (one load each)."""
    return request.param


def _host_x(model, x):
    """A [B, C, H, W] latent as the host's sampler hands it to this model (one frame for 3-D formats)."""
    return x.unsqueeze(2) if model.get_model_object("latent_format").latent_dimensions == 3 else x


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
        expected = _host_velocity(model, clip, prompt, _host_x(model, x[i:i + 1]), sigma[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], expected.reshape(1, *x.shape[1:]), rtol=1e-3, atol=1e-3)


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
    assert not any(re.search(r"mod|embed|final|norm", n) for n in targets), sorted(targets)
    # the identifier is checked in the tokenizer that reads the prompt (not HunyuanImage's byte-level ByT5)
    assert [type(t).__name__ for t in backend.tokenizers()] == [TOKENIZER[name]]
    # which splits the usual identifiers: the suggestions come from its own vocabulary and pass the check
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
    x = _host_x(model, torch.randn(1, files.latent_channels, side, side, generator=torch.Generator().manual_seed(5)))
    sigma = torch.tensor([0.6])
    v_base = _host_velocity(model, clip, PROMPT, x, sigma)
    v_lora = _host_velocity(lm, lc, PROMPT, x, sigma)
    assert not torch.equal(v_base, v_lora)
    torch.testing.assert_close(v_lora, _host_velocity(backend.result()[0], clip, PROMPT, x, sigma),
                               rtol=1e-3, atol=1e-3)
    assert _digest(model.model) == before, "training changed the shared base MODEL's weights"


def test_class_images_are_the_stock_ksampler_images(comfy_host, pack):
    """Qwen-Image's class image is the PNG of a stock graph with that seed: CLIPTextEncode, an empty
    16-channel latent (EmptySD3LatentImage's), KSampler (one frame for the Wan latent format), VAEDecode."""
    files, model, clip, vae = _load("qwen_image")
    _assert_class_image_is_stock(pack, model, clip, vae)


# supported_models class -> the model_base class its get_model builds (whose default ModelType decides sampling)
REFUSED = {"CosmosI2VPredict2": "CosmosPredict2", "HunyuanDiT1": "HunyuanDiT"}


@pytest.mark.parametrize("cls", sorted(REFUSED))
def test_families_that_do_not_train_are_refused_by_name(comfy_host, pack, cls):
    """Each text-to-image family of the host that does not train here is refused before any work, by its
    class name and its sampling, with what trains (a stand-in MODEL: detection reads only the host's
    model config and model_sampling objects)."""
    import inspect

    import comfy.model_base
    import comfy.supported_models

    config_cls = getattr(comfy.supported_models, cls, None)
    if config_cls is None:
        pytest.skip(f"this host has no {cls}")
    families = importlib.import_module(pack.__name__ + ".nodes.families")
    base = importlib.import_module(pack.__name__ + ".dreambooth_core.backends.base")
    config = config_cls(dict(config_cls.unet_config, hidden_size=6144))  # Flux 2 scales its memory estimate by it
    model_type = inspect.signature(getattr(comfy.model_base, REFUSED[cls]).__init__).parameters["model_type"].default
    sampling = comfy.model_base.model_sampling(config, model_type)
    model = SimpleNamespace(model=SimpleNamespace(model_config=config), get_model_object=lambda _name: sampling)
    with pytest.raises(base.UnsupportedModel, match=rf"the connected MODEL is {cls} \(\w+ sampling\); DreamBooth trains "
                                                   r"SD1\.x, .*Qwen-Image, AuraFlow, HunyuanImage 2\.1, HiDream, Omnigen2"):
        families.detect(model)
