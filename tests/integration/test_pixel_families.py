"""The comfy backend on Chroma Radiance (both hosts), Chroma's transformer in pixel space, which trains through
a row like Chroma's in families.py, in-process on the host's own objects, with a tiny checkpoint in its real layout
loaded through its detection scaffolding (family_checkpoints_pixel.py). Its VAE is the host's `pixel_space`
one: the backend's latents are the pixels in [-1, 1] (latent_factor 1), cached and noised as any latents.
Checked as test_flow_families_f2.py checks Flux 2 and Cosmos Predict2:
  - the backend's velocity is the host's own (its encoding, `extra_conds`, `apply_model`), with Chroma's shift;
    images round-trip through encode_images / decode_latents as the host's VAE encodes and decodes them;
  - with gradient checkpointing on, the transformer blocks and the NeRF head's blocks are recomputed: the
    bytes kept for backward fall (to ~13 %), and the LoRA gradient is the same as with it off;
  - a few LoRA steps of the core trainer with prior preservation (class images from `generate`) lower the
    held-out flow loss of the identifier prompt; the file carries `lora_unet_` keys of the double/single
    blocks' attention and MLP Linears (none of the NeRF head) and the family's metadata; the stock
    LoraLoader uses every key and changes the model's output as the trained MODEL does; the base MODEL
    stays bit-identical;
  - a class image equals the stock graph's (EmptyChromaRadianceLatentImage, KSampler, VAEDecode) with that seed.
Both variants: the velocity-predicting model and the x0-predicting releases (0.33; the host's model turns
x0 into the velocity). Stable Cascade's stage B stays refused (families._WHY; stage C, the prior, trains:
test_cascade_family.py): checked here by name and reason.
"""
from __future__ import annotations

import importlib
import logging
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import family_checkpoints as fc  # noqa: E402
import family_checkpoints_llm as fl  # noqa: E402
import family_checkpoints_pixel as fp  # noqa: E402
from stock_graph import stock_image  # noqa: E402
from test_flow_families import _checkpointing_bytes, _digest, _flow_loss, _lora_setup, _training_data  # noqa: E402
from test_flow_families_f2 import _host_output  # noqa: E402

PROMPT = "a photo of sks dog"
_LOADED: dict = {}
_UNSUPPORTED: dict = {}  # fixture -> why this host has none


def _cb(pack):
    return importlib.import_module(pack.__name__ + ".nodes.comfy_backend")


def _load(name):
    """(files, MODEL, CLIP, VAE) of a tiny Chroma Radiance, loaded once per module under inference mode."""
    if name in _UNSUPPORTED:
        pytest.skip(_UNSUPPORTED[name])
    if name not in _LOADED:
        _LOADED.clear()
        try:
            files = fp.ensure_family(name)
        except fc.FamilyUnsupported as e:
            _UNSUPPORTED[name] = str(e)
            pytest.skip(str(e))
        with fp.radiance_detection(), torch.inference_mode():
            _LOADED[name] = (files, *fl.load(files))
    return _LOADED[name]


@pytest.fixture(scope="module", params=list(fp.FAMILIES))
def name(request):
    """The fixture's name; module-scoped, so pytest runs a variant's tests together (one load each)."""
    return request.param


def test_predict_is_the_hosts_output_in_pixel_space(comfy_host, pack, name):
    files, model, clip, vae = _load(name)
    assert type(model.model.model_config).__name__ == "ChromaRadiance"  # the host's own detection
    unet_config = model.model.model_config.unet_config
    assert {k: unet_config.get(k) for k in files.expect} == files.expect
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    assert backend.family == "chroma-radiance" and backend.prediction_type == "flow"
    assert backend.latent_factor == 1 and backend.schedule().shift == pytest.approx(np.exp(1.15))
    # the pixels are the latents, as the host's pixel_space VAE encodes and decodes them
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latents = backend.encode_images(pixels)
        host = vae.encode(((pixels + 1) / 2).movedim(1, -1))
        decoded = backend.decode_latents(latents)
    torch.testing.assert_close(latents, host.float())
    torch.testing.assert_close(latents, pixels, rtol=0, atol=1e-6)
    torch.testing.assert_close(decoded, pixels, rtol=0, atol=1e-6)
    prompts = [PROMPT, "a dog"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.35, 0.8])
    with torch.no_grad():
        cond = backend.encode_text(prompts, size=(32, 32))
        out = backend.predict(x, sigma, cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(out[i:i + 1], _host_output(model, clip, prompt, x[i:i + 1], sigma[i:i + 1]),
                                   rtol=1e-3, atol=1e-3)


def test_gradient_checkpointing_covers_the_nerf_head(comfy_host, pack, name):
    """With checkpointing on, the transformer blocks and the NeRF head's blocks (whose generated per-patch
    MLP weights are most of what a pixel-space step keeps for backward) keep only their inputs: the saved
    bytes fall, and the LoRA gradient is the same on and off."""
    if name != "chroma_radiance":
        pytest.skip("the x0 variant's blocks are the same")
    files, model, clip, vae = _load(name)
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    g = torch.Generator().manual_seed(4)
    x, sigma = torch.randn(1, 3, 64, 64, generator=g), torch.tensor([0.4])
    target = torch.randn(x.shape, generator=g)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            cond = backend.encode_text([PROMPT], size=(64, 64))
            network = _lora_setup(pack, backend)
            params = list(network.parameters())
            grads = {}
            for on in (False, True):
                backend.set_gradient_checkpointing(on)
                grads[on] = torch.autograd.grad(((backend.predict(x, sigma, cond) - target) ** 2).mean(), params)
            saved = _checkpointing_bytes(backend, network, lambda: backend.predict(x, sigma, cond))
    finally:
        backend.release()
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert saved[True] < 0.25 * saved[False], saved


def test_lora_training_lowers_flow_loss_and_loads_in_the_stock_loader(comfy_host, pack, name, tmp_path, caplog):
    import comfy.lora
    import comfy.utils
    import nodes as host_nodes
    from safetensors import safe_open

    files, model, clip, vae = _load(name)
    cb = _cb(pack)
    core = lambda m: importlib.import_module(pack.__name__ + ".dreambooth_core." + m)  # noqa: E731
    config_mod, trainer_mod, base_mod = core("config"), core("training.trainer"), core("backends.base")
    before = _digest(model.model)

    backend = cb.ComfyBackend(model, clip, vae)
    targets = backend.lora_targets(True, False)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert "lora_unet_single_blocks_0_linear2" in targets
    assert all(key_map.get(n) == backend._target_keys[n][1] for n in targets)
    assert all(re.match(r"lora_unet_(double|single)_blocks_0_", n) for n in targets), sorted(targets)

    instance, classes, latents, cond = _training_data(backend, base_mod)
    assert latents.shape == (3, 3, 64, 64)
    untrained = _flow_loss(backend, latents, cond)
    config = config_mod.TrainConfig(token="sks", class_noun="dog", resolution=64, prior=True, prior_weight=1.0,
                                    rank=4, steps=4, learning_rate=1e-2, batch_size=1, seed=0,
                                    output_dir=str(tmp_path), save_name=name, save_precision="fp32",
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
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("chroma_radiance",
                                                                               "chroma-radiance/lora")

    shutil.copyfile(result.lora_path, f"{comfy_host.get_folder_paths('loras')[0]}/{name}.safetensors")
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        lm, lc = host_nodes.LoraLoader().load_lora(model, clip, f"{name}.safetensors", 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(lm.patches) == len(names), "every key patches one weight"
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.6])
    v_base = _host_output(model, clip, PROMPT, x, sigma)
    v_lora = _host_output(lm, lc, PROMPT, x, sigma)
    assert not torch.equal(v_base, v_lora)
    torch.testing.assert_close(v_lora, _host_output(backend.result()[0], clip, PROMPT, x, sigma), rtol=1e-3, atol=1e-3)
    assert _digest(model.model) == before, "training changed the shared base MODEL's weights"


def test_class_images_are_the_stock_graphs_images(comfy_host, pack, name):
    """The backend's class image (seed 7, 2 Euler steps, CFG 3 against "blurry", 64×48) is the PNG of a stock
    graph with that seed: CLIPTextEncode, EmptyChromaRadianceLatentImage, KSampler, VAEDecode."""
    from comfy_extras.nodes_chroma_radiance import EmptyChromaRadianceLatentImage

    files, model, clip, vae = _load(name)
    base = importlib.import_module(pack.__name__ + ".dreambooth_core.backends.base")
    backend = _cb(pack).ComfyBackend(model, clip, vae)
    settings = base.SampleSettings(steps=2, guidance=3.0, sampler="euler:simple", negative_prompt="blurry",
                                   width=64, height=48)
    with torch.inference_mode():
        ours = backend.generate(["a photo of a dog"], [7], settings)[0]
    latent = EmptyChromaRadianceLatentImage.execute(width=64, height=48, batch_size=1).result[0]
    stock = stock_image(model, clip, vae, "a photo of a dog", "blurry", latent, 7, 2, 3.0, "euler", "simple")
    assert ours.shape == (48, 64, 3) and np.array_equal(ours, stock)


@pytest.mark.parametrize("cls,why", [("Stable_Cascade_B", "not a text-to-image model: train stage C")])
def test_stable_cascade_is_refused_with_why(comfy_host, pack, cls, why):
    """Stage B (a stand-in MODEL: detection reads only the model config and model_sampling) is refused by
    name, with why it does not train here (and which stage does)."""
    import comfy.model_base
    import comfy.supported_models

    families = importlib.import_module(pack.__name__ + ".nodes.families")
    base = importlib.import_module(pack.__name__ + ".dreambooth_core.backends.base")
    config_cls = getattr(comfy.supported_models, cls)
    config = config_cls(dict(config_cls.unet_config))
    sampling = comfy.model_base.model_sampling(config, comfy.model_base.ModelType.STABLE_CASCADE)
    model = SimpleNamespace(model=SimpleNamespace(model_config=config), get_model_object=lambda _name: sampling)
    with pytest.raises(base.UnsupportedModel, match=rf"the connected MODEL is {cls} \(EPS sampling\); "
                                                   rf"DreamBooth trains .*Chroma Radiance.*{why}"):
        families.detect(model)
