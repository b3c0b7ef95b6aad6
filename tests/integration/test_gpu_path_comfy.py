"""One full training step of the comfy backend with the model 'on CUDA', on a machine without a GPU.

The stand-in for CUDA is the meta device (tests/meta_cuda.py): like CUDA it refuses CPU tensors in its
ops, and tensors on it cost nothing. The host's memory manager loads the MODEL (and the VAE, and a
trained CLIP) onto it as it loads them onto a GPU (`load_device`; its free-memory probe answers for meta),
and what the host hands back from its VAE and text encoders lands where `--gpu-only` puts it (the
intermediate device: meta). Then the core trainer's own setup and one step of its own device code run
(`_start`, `_micro_step`) with prior preservation, for each crop (a non-square bucket beside square class
images: two forward passes) and the precisions a GPU trains in: the checkpoint's weights loaded in fp32 or
fp16, the node's training dtype (the compute dtype the host casts weights to) fp32 or bf16. The node trains
without autocast (mixed_precision "no"); the stand-in's CUDA autocast is there for a config that asks for it.

Catches: a tensor the backend, the host's calls it makes, or the trainer leave on the CPU and mix with the
model's; a dtype clash where meta's kernels check dtypes (convolutions with a bias, bmm, attention,
indexing, checkpoint recomputation). Cannot catch: a bias-free linear in another dtype than its weight
(meta's kernel does not check it), kernels or dtypes CUDA lacks, streams, and any value.
"""
from __future__ import annotations

import importlib
from typing import List, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")

META = torch.device("meta")
#: (checkpoint weights, training dtype) as a GPU trains: fp32 throughout; an fp16 checkpoint computed in
#: bf16 (the node's default on a GPU with bf16) or in fp32 (one without)
PRECISIONS = [(torch.float32, torch.float32), (torch.float16, torch.bfloat16), (torch.float16, torch.float32)]
PRECISION_IDS = ["fp32", "fp16-bf16", "fp16-fp32"]


def _core(pack, name: str):
    return importlib.import_module(f"{pack.__name__}.dreambooth_core.{name}")


@pytest.fixture
def meta_host(host, monkeypatch):
    """The host's memory manager with meta as a device it can load onto: its free-memory probe (which
    asks CUDA for any device but the CPU) answers for meta; what its text encoders return lands on the
    intermediate device, meta, as `--gpu-only` makes it the GPU. Everything loaded is unloaded after."""
    import comfy.model_management as mm

    probe = mm.get_free_memory

    def get_free_memory(dev=None, torch_free_too=False):
        if dev is not None and torch.device(dev).type == "meta":
            return (1 << 40, 1 << 40) if torch_free_too else 1 << 40
        return probe(dev, torch_free_too)

    monkeypatch.setattr(mm, "get_free_memory", get_free_memory)
    monkeypatch.setattr(mm, "intermediate_device", lambda: META)
    yield mm
    mm.unload_all_models()


def _on_meta(patcher) -> None:
    """A patcher (MODEL, CLIP's, VAE's) that the memory manager loads onto meta, and offloads to meta
    (meta tensors cannot go back to the CPU: offloading is moving them nowhere)."""
    patcher.load_device = patcher.offload_device = META


def _sd15(mini_checkpoint, weights: torch.dtype):
    """MODEL, CLIP, VAE of the mini SD1.5 through the stock loader (weights in `weights`), under inference
    mode as the executor loads them, each with meta as its load device; the VAE's output goes to meta."""
    import comfy.sd

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(mini_checkpoint),
                                                                 model_options={"dtype": weights})[:3]
    return _placed(model, clip, vae)


def _placed(model, clip, vae):
    for patcher in (model, clip.patcher, vae.patcher):
        _on_meta(patcher)
    vae.device, vae.output_device = META, META
    return model, clip, vae


def _photos(pack, crop: str, size: Tuple[int, int] = (112, 64)) -> list:
    """Three subject photos through the core's dataset preparation at 64 px: a square crop (center,
    random) or, landscape photos, the 80x48 bucket (crop="bucket")."""
    from PIL import Image

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(3)]
    data = _core(pack, "dataset").prepare_dataset(images, token="sks", class_noun="dog", resolution=64, crop=crop,
                                                  flip=True)
    return data.items


def _class_images(n: int = 2, size: int = 64) -> List[object]:
    from types import SimpleNamespace

    from PIL import Image

    rng = np.random.default_rng(1)
    return [SimpleNamespace(image=Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
                            caption="a photo of a dog") for _ in range(n)]


def _step(pack, backend, crop: str, training: torch.dtype, loaded: bool = False, **settings):
    """The node's settings for a run (mixed_precision "no", its training dtype), the trainer made as
    run_job makes it, and one step on meta (meta_cuda.run_one_step); `loaded`: the host loads the MODEL
    before the run starts (as after sampling the class images). Returns the run's RunState."""
    from meta_cuda import run_one_step

    config = _core(pack, "config").TrainConfig(class_noun="dog", output_dir="unused", batch_size=2, flip=True,
                                               crop=crop, resolution=64, mixed_precision="no", **settings)
    backend.set_training_dtype(training)
    trainer_module = _core(pack, "training.trainer")
    accel = _core(pack, "training.accel")
    trainer = trainer_module.DreamBoothTrainer(backend, config, _photos(pack, crop), _class_images(),
                                               accelerator=accel.make_accelerator(config, backend.device, reset=True))
    if loaded:
        import comfy.model_management as mm

        mm.load_models_gpu([backend.base_model])
    try:
        return run_one_step(trainer)
    finally:
        backend.release()


@pytest.mark.parametrize("crop", ["center", "random", "bucket"])
@pytest.mark.parametrize("weights,training", PRECISIONS, ids=PRECISION_IDS)
def test_sd15_one_step_with_the_model_on_the_accelerator(pack, meta_host, mini_checkpoint, crop, weights, training):
    """SD1.5: a UNet LoRA (the frozen path: LoRA on the activations) with prior preservation."""
    cb = importlib.import_module(pack.__name__ + ".nodes.comfy_backend")
    model, clip, vae = _sd15(mini_checkpoint, weights)
    assert model.model.get_dtype() == weights
    backend = cb.ComfyBackend(model, clip, vae, mode="lora")
    assert backend.device == META
    run = _step(pack, backend, crop, training)
    sizes = {tuple(b.latents.shape[-2:]) for b in run.inst + run.cls}
    assert sizes == ({(6, 10), (8, 8)} if crop == "bucket" else {(8, 8)})
    assert all(b.latents.device == META for b in run.inst + run.cls)
    assert {p.device for p in model.model.diffusion_model.parameters()} == {META}


@pytest.mark.parametrize("crop", ["center", "bucket"])
@pytest.mark.parametrize("weights,training", PRECISIONS[:2], ids=PRECISION_IDS[:2])
def test_sd3_one_step_with_the_model_on_the_accelerator(pack, meta_host, crop, weights, training):
    """A flow family (the mini SD3 of family_checkpoints, loaded by the host's separate loaders): the
    transformer's LoRA through the flow path (its blocks checkpointed), σ and velocity targets."""
    import comfy.sd
    import family_checkpoints as fc

    cb = importlib.import_module(pack.__name__ + ".nodes.comfy_backend")
    try:
        files = fc.ensure_family("sd3")
    except fc.FamilyUnsupported as e:
        pytest.skip(str(e))
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(files.diffusion_model), model_options={"dtype": weights})
        clip, vae = files.load_clip(), files.load_vae()
    model, clip, vae = _placed(model, clip, vae)
    assert model.model.get_dtype() == weights
    backend = cb.ComfyBackend(model, clip, vae, mode="lora")
    assert backend.device == META and backend.schedule().kind == "flow"
    run = _step(pack, backend, crop, training)
    assert all(b.latents.device == META and b.latents.shape[1] == 16 for b in run.inst + run.cls)
    assert {p.device for p in model.model.diffusion_model.parameters()} == {META}


@pytest.mark.parametrize("variant,settings", [
    ("text-encoder", dict(train_text_encoder=True, gradient_checkpointing=True)),
    ("full", dict(mode="full")),
], ids=["text-encoder", "full"])
def test_sd15_other_runs_with_the_model_on_the_accelerator(pack, meta_host, mini_checkpoint, variant, settings):
    """As above (fp16 weights computed in bf16) for a LoRA on the text encoder too (its adapters as weight
    wrappers of the CLIP the memory manager loads, the blocks checkpointed) and a full fine-tune (a
    trainable difference for every weight, as weight wrappers). The full fine-tune starts from a MODEL the
    host has loaded already (as after sampling the class images): the memory manager moves a wrapper's
    difference by `param.data = ...`, which cannot take a meta tensor into a CPU parameter (CUDA can)."""
    cb = importlib.import_module(pack.__name__ + ".nodes.comfy_backend")
    model, clip, vae = _sd15(mini_checkpoint, torch.float16)
    backend = cb.ComfyBackend(model, clip, vae, mode=settings.get("mode", "lora"),
                              train_text_encoder=settings.get("train_text_encoder", False))
    _step(pack, backend, "center", torch.bfloat16, loaded=variant == "full", **settings)
    assert {p.device for p in model.model.diffusion_model.parameters()} == {META}
