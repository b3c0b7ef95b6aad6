"""What runs differently on an accelerator, checked without one: the devices and dtypes the
trainer and the diffusers backend put tensors on (a CUDA-only mistake fails here too)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_backend
from dreambooth_core.config import TrainConfig
from dreambooth_core.training.cache import Bucket as _Bucket
from dreambooth_core.training.draw import step_generator
from dreambooth_core.training.trainer import DreamBoothTrainer
from test_trainer import CLASS, INSTANCE


def _bucket(n: int, device: str, flip: bool, masks: bool = False) -> _Bucket:
    gen = torch.Generator().manual_seed(n)
    latents = torch.randn(n, 4, 8, 8, generator=gen)
    mask = torch.rand(n, 1, 8, 8, generator=gen)
    return _Bucket(latents.to(device), latents.flip(-1).to(device) if flip else None,
                   [f"caption {i}" for i in range(n)], (16, 16), mask.to(device) if masks else None)


@pytest.mark.parametrize("masks", [False, True])
def test_the_draw_keeps_latents_on_their_device(tmp_path, masks):
    """The diffusers and WebUI backends cache latents on their device (CUDA): the flip choice, drawn
    on the CPU generator, must follow them there. `meta` stands for CUDA: like it, it refuses a CPU
    condition against its tensors. On the CPU the draw is what it always was."""
    config = TrainConfig(class_noun="star", output_dir=str(tmp_path), batch_size=2, flip=True,
                         mask_background_weight=0.25)
    trainer = DreamBoothTrainer(make_tiny_backend(), config, INSTANCE, CLASS)
    parts, weight = trainer._draw(3, 0, [_bucket(3, "meta", True, masks)], [_bucket(4, "meta", False)])
    assert [p[0].device.type for p in parts] == ["meta", "meta"]
    assert (weight is not None) == masks and (weight is None or weight.device.type == "meta")

    inst = _bucket(3, "cpu", True, masks)
    lat = trainer._draw(3, 0, [inst], [_bucket(4, "cpu", False)])[0][0][0]
    g = step_generator(0, 3, 0)
    torch.multinomial(torch.tensor([3.0]), 1, generator=g)
    idx = torch.randint(3, (2,), generator=g)
    flips = torch.randint(2, (2,), generator=g).bool().view(-1, 1, 1, 1)
    assert torch.equal(lat, torch.where(flips, inst.flipped[idx], inst.latents[idx]))


def _fp16_backend(force_upcast: bool):
    """The tiny model with its weights in fp16 (as `--mixed-precision fp16` loads them), its VAE
    configured as SDXL's (force_upcast: it overflows in fp16) or as a VAE that is fine in fp16."""
    from diffusers import AutoencoderKL

    from dreambooth_core.backends.diffusers_backend import DiffusersBackend

    tiny = make_tiny_backend()
    settings = {k: v for k, v in tiny.vae.config.items() if not k.startswith("_")}
    vae = AutoencoderKL(**{**settings, "force_upcast": force_upcast})
    vae.load_state_dict(tiny.vae.state_dict())
    return DiffusersBackend(unet=tiny.unet, vae=vae, text_encoders=tiny.text_encoders, tokenizers=tiny.tokenizers(),
                            scheduler_config=tiny.scheduler_config, name="tiny-fp16", fingerprint="tiny-fp16",
                            native_resolution=16, weight_dtype=torch.float16)


@pytest.mark.parametrize("force_upcast", [True, False])
def test_an_fp16_vae_that_asks_for_fp32_encodes_and_decodes_in_fp32(force_upcast):
    """SDXL's VAE overflows in fp16 (NaN latents, a run that stops as diverged): its config says
    `force_upcast`, and diffusers' SDXL pipelines run it in fp32 then. So does the backend, and the
    VAE is fp16 again after the call; a VAE without the flag stays in fp16."""
    backend = _fp16_backend(force_upcast)
    assert backend.vae.config.force_upcast == force_upcast
    seen = []
    for part in (backend.vae.encoder, backend.vae.decoder):
        part.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = backend.encode_images(pixels)
    images = backend.decode_latents(latents)
    want = torch.float32 if force_upcast else torch.float16
    assert seen == [want, want]
    assert backend.vae.dtype == torch.float16
    assert latents.dtype == images.dtype == torch.float32
    assert torch.isfinite(latents).all() and torch.isfinite(images).all()
