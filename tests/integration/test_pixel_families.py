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

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import family_checkpoints_llm as fl  # noqa: E402
import family_checkpoints_pixel as fp  # noqa: E402
from family_checks import (PROMPT, Family, FamilySuite, assert_class_image_is_stock,  # noqa: E402
                           assert_detection_refuses, check_detected, check_lora_training, check_predict,
                           checkpointing_bytes, comfy_backend, host_output, lora_setup)

RADIANCE = Family("chroma-radiance", "lora_unet_single_blocks_0_linear2", "chroma_radiance", "chroma-radiance/lora",
                  steps=4, lr=1e-2, checkpointing=True)
SUITE = FamilySuite({name: RADIANCE for name in fp.FAMILIES}, ensure=fp.ensure_family, load=fl.load,
                    host=host_output, save_prefix="", detection=fp.radiance_detection)
name = SUITE.fixture()


def test_predict_is_the_hosts_output_in_pixel_space(comfy_host, pack, name):
    files, model, clip, vae = loaded = SUITE.load(name)
    backend = check_detected(pack, loaded, SUITE[name])
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
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    check_predict(backend, model, clip, SUITE.host, x, torch.tensor([0.35, 0.8]), (32, 32))


def test_gradient_checkpointing_covers_the_nerf_head(comfy_host, pack, name):
    """With checkpointing on, the transformer blocks and the NeRF head's blocks (whose generated per-patch
    MLP weights are most of what a pixel-space step keeps for backward) keep only their inputs: the saved
    bytes fall, and the LoRA gradient is the same on and off."""
    if name != "chroma_radiance":
        pytest.skip("the x0 variant's blocks are the same")
    files, model, clip, vae = SUITE.load(name)
    backend = comfy_backend(pack).ComfyBackend(model, clip, vae)
    g = torch.Generator().manual_seed(4)
    x, sigma = torch.randn(1, 3, 64, 64, generator=g), torch.tensor([0.4])
    target = torch.randn(x.shape, generator=g)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            cond = backend.encode_text([PROMPT], size=(64, 64))
            network = lora_setup(pack, backend)
            params = list(network.parameters())
            grads = {}
            for on in (False, True):
                backend.set_gradient_checkpointing(on)
                grads[on] = torch.autograd.grad(((backend.predict(x, sigma, cond) - target) ** 2).mean(), params)
            saved = checkpointing_bytes(backend, network, lambda: backend.predict(x, sigma, cond))
    finally:
        backend.release()
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert saved[True] < 0.25 * saved[False], saved


def test_lora_training_lowers_flow_loss_and_loads_in_the_stock_loader(comfy_host, pack, name, tmp_path, caplog):
    """The LoRA is on the double/single blocks' attention and MLP Linears only (none of the NeRF head)."""
    check_lora_training(comfy_host, pack, SUITE, name, tmp_path, caplog, pattern=r"lora_unet_(double|single)_blocks_0_",
                        probe_shape=(3, 32, 32))


def test_class_images_are_the_stock_graphs_images(comfy_host, pack, name):
    """The backend's class image (seed 7, 2 Euler steps, CFG 3 against "blurry", 64×48) is the PNG of a stock
    graph with that seed: CLIPTextEncode, EmptyChromaRadianceLatentImage, KSampler, VAEDecode."""
    from comfy_extras.nodes_chroma_radiance import EmptyChromaRadianceLatentImage

    files, model, clip, vae = SUITE.load(name)
    assert_class_image_is_stock(pack, model, clip, vae, latent=lambda _factor: EmptyChromaRadianceLatentImage.execute(
        width=64, height=48, batch_size=1).result[0])


@pytest.mark.parametrize("cls,why", [("Stable_Cascade_B", "not a text-to-image model: train stage C")])
def test_stable_cascade_is_refused_with_why(comfy_host, pack, cls, why):
    """Stage B (a stand-in MODEL: detection reads only the model config and model_sampling) is refused by
    name, with why it does not train here (and which stage does)."""
    import comfy.model_base
    import comfy.supported_models

    config_cls = getattr(comfy.supported_models, cls)
    config = config_cls(dict(config_cls.unet_config))
    sampling = comfy.model_base.model_sampling(config, comfy.model_base.ModelType.STABLE_CASCADE)
    assert_detection_refuses(pack, config, sampling, rf"the connected MODEL is {cls} \(EPS sampling\); "
                                                     rf"DreamBooth trains .*Chroma Radiance.*{why}")
