"""What runs differently on an accelerator, checked without one: the devices and dtypes the
trainer and the diffusers backend put tensors on (a CUDA-only mistake fails here too), down to a
full training step with the model on the meta device standing in for CUDA (meta_cuda.py). The same
step runs for the ComfyUI backend (tests/integration/test_gpu_path_comfy.py) and the WebUI's
(tests/a1111/test_gpu_path_webui.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_backend
from meta_cuda import cuda_stand_in, run_one_step
from dreambooth_core.config import TrainConfig
from dreambooth_core.training.cache import Bucket as _Bucket
from dreambooth_core.training.draw import step_generator
from dreambooth_core.training.trainer import DreamBoothTrainer
from test_trainer import CLASS, INSTANCE, Ex


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


# ------------------------------------------------------------------------------ one step "on CUDA"

#: (mixed_precision, the frozen weights' dtype) as the CLI loads a model on an accelerator for each
#: precision (commands.run_training: fp16 / bf16 weights under that autocast, fp32 without)
PRECISIONS = [("no", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]


def _photos(crop: str) -> list:
    """Three subject photos through the real dataset preparation at 32 px: a square crop (center,
    random) or, landscape photos, the 40x24 aspect bucket (crop="bucket"), beside 32x32 class images."""
    from PIL import Image

    from dreambooth_core.dataset import prepare_dataset

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (36, 64, 3), dtype=np.uint8)) for _ in range(3)]
    data = prepare_dataset(images, token="sks", class_noun="star", resolution=32, crop=crop, flip=True)
    return data.items


def _class_images() -> list:
    """Four 32x32 class images (as generated ones come: square, at the run's resolution)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    return [Ex(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), "a photo of a star")
            for _ in range(4)]


def _meta_backend(weight_dtype: torch.dtype):
    """The tiny model with the meta device as its accelerator, its frozen weights in `weight_dtype`."""
    from dreambooth_core.backends.diffusers_backend import DiffusersBackend

    tiny = make_tiny_backend()
    fingerprint = tiny.base_fingerprint()
    backend = DiffusersBackend(unet=tiny.unet, vae=tiny.vae, text_encoders=tiny.text_encoders,
                               tokenizers=tiny.tokenizers(), scheduler_config=tiny.scheduler_config, name="tiny-meta",
                               fingerprint="tiny-meta", native_resolution=32, device=torch.device("meta"),
                               weight_dtype=weight_dtype)
    # A hash of the weights' bytes, read back to the host: taken before they went to meta (no data).
    backend.base_fingerprint = lambda: fingerprint
    return backend


def test_meta_refuses_cpu_tensors_as_cuda_does():
    """The premise of the steps below: an op that mixes a CPU tensor (but a 0-dim scalar) into meta
    tensors raises, as it would with CUDA tensors (inside meta_cuda.cuda_stand_in for every op)."""
    with pytest.raises((RuntimeError, ValueError)):
        torch.zeros(2, device="meta") + torch.zeros(2)
    with pytest.raises((RuntimeError, ValueError)):
        torch.cat([torch.zeros(2, device="meta"), torch.zeros(2)])
    assert (torch.zeros(2, device="meta") * torch.tensor(2.0)).device.type == "meta"
    # meta's matmul and convolution kernels do not check devices; the stand-in checks every op
    w = torch.zeros(3, 4, requires_grad=True)
    assert torch.nn.functional.linear(torch.zeros(2, 4, device="meta"), w).device.type == "meta"
    with cuda_stand_in():
        with pytest.raises(RuntimeError, match="same device"):
            torch.nn.functional.linear(torch.zeros(2, 4, device="meta"), w)
        x = torch.zeros(2, 4, device="meta", requires_grad=True)
        y = x.sum() * 2
        assert x[torch.tensor([1])].device.type == "meta"  # CPU indices: allowed, as on CUDA
        assert torch.zeros(2, 4).to("meta").device.type == "meta"
        y.backward()


def test_the_stand_in_autocast_casts_as_cuda_autocast():
    """meta_cuda.cuda_stand_in: under CUDA's autocast, meta convolutions run in the lower precision,
    norms in float32, concatenation in the widest input type, also when a checkpointed block is
    recomputed in backward (outside the autocast region); without it a half convolution refuses a
    float input, as CUDA's does."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    x = torch.zeros(1, 4, 8, 8, device="meta", requires_grad=True)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, device="meta", dtype=torch.float16)
    with cuda_stand_in():
        with pytest.raises(RuntimeError):
            conv(x)
        with torch.autocast("cuda", dtype=torch.float16):
            assert torch.is_autocast_enabled()
            assert conv(x).dtype == torch.float16
            assert F.group_norm(conv(x), 2).dtype == torch.float32
            assert torch.cat([conv(x), x.repeat(1, 2, 1, 1)]).dtype == torch.float32
            y = checkpoint(lambda t: F.group_norm(conv(t), 2), x, use_reentrant=False)
        assert not torch.is_autocast_enabled()
        y.sum().backward()  # recomputed: same dtypes as in the forward, or checkpoint raises
    assert x.grad.dtype == torch.float32 and x.grad.device.type == "meta"


@pytest.mark.parametrize("crop", ["center", "random", "bucket"])
@pytest.mark.parametrize("precision,weight_dtype", PRECISIONS, ids=[p for p, _ in PRECISIONS])
def test_one_step_with_the_model_on_the_accelerator(tmp_path, crop, precision, weight_dtype):
    """One full LoRA step with prior preservation, the model on `meta` standing in for CUDA, for
    each crop (a bucket apart from the square class images: two forward passes) and precision.

    Precision as on a GPU: the frozen weights in the run's dtype, the accelerator's CUDA autocast
    (meta_cuda.as_on_a_gpu; accelerate on this CPU makes none for fp16).
    Catches: any tensor the backend or trainer makes on the CPU and mixes with the model's (cached
    latents and embeddings, noise, timesteps, the schedule's ᾱ, masks, loss weights, the optimizer's
    state); dtype clashes where meta's kernels check them (convolutions with a bias, bmm, attention,
    indexing, checkpoint recomputation) under that autocast.
    Cannot catch: a bias-free linear given another dtype than its weight (meta's kernel does not
    check it, CUDA's does), fp16's loss scaling (CUDA's GradScaler reads its inf check back to the
    host), accelerate's float32 outputs of a model it wraps for fp16, a dtype CUDA has no kernel
    for, and any value (NaN, overflow): there are none."""
    from dreambooth_core.training.accel import make_accelerator

    config = TrainConfig(class_noun="star", output_dir=str(tmp_path), batch_size=2, flip=True, crop=crop,
                         mixed_precision=precision, resolution=32, caption_dropout=0.5)
    backend = _meta_backend(weight_dtype)
    trainer = DreamBoothTrainer(backend, config, _photos(crop), _class_images(),
                                accelerator=make_accelerator(config, backend.device, reset=True))
    run = run_one_step(trainer)
    sizes = {b.latents.shape[-2:] for b in run.inst + run.cls}
    assert sizes == ({(12, 20), (16, 16)} if crop == "bucket" else {(16, 16)})


def _masked_photos() -> list:
    """Three 32x32 subject photos with subject masks (the masked instance loss)."""
    from PIL import Image

    from test_trainer import MaskedEx

    rng = np.random.default_rng(4)
    return [MaskedEx(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), "a photo of sks star",
                     Image.fromarray(rng.integers(0, 2, (32, 32), dtype=np.uint8) * 255)) for _ in range(3)]


@pytest.mark.parametrize("variant,precision,settings", [
    ("text-encoder", "bf16", dict(train_text_encoder=True, gradient_checkpointing="full")),
    ("masked-accumulated", "fp16", dict(gradient_accumulation=2, min_snr_gamma=5.0, offset_noise=0.05)),
    ("full", "bf16", dict(mode="full", train_text_encoder=True)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_one_step_of_other_runs_with_the_model_on_the_accelerator(tmp_path, variant, precision, settings):
    """As above (same stand-in, same limits) for what else a step can do on the device: encode the
    captions with a trained text encoder under checkpointing, weight the instance loss by masks over
    two micro-steps with min-SNR and offset noise, fine-tune every weight."""
    from dreambooth_core.training.accel import make_accelerator

    config = TrainConfig(class_noun="star", output_dir=str(tmp_path), batch_size=2, flip=True,
                         mixed_precision=precision, resolution=32, **settings)
    backend = _meta_backend(dict(PRECISIONS)[precision])
    photos = _masked_photos() if variant.startswith("masked") else _photos("center")
    trainer = DreamBoothTrainer(backend, config, photos, _class_images(),
                                accelerator=make_accelerator(config, backend.device, reset=True))
    run_one_step(trainer)
