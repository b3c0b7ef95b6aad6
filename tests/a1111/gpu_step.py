"""Run by test_gpu_path_webui.py under the WebUI's Python: bring the WebUI up in-process (as its API-only
start does: `initialize.initialize()`, which loads this extension, then the checkpoint), put its loaded model
'on CUDA' (the meta device, tests/meta_cuda.py) as the WebUI holds a model on a GPU, and run one training
step of the A1111 backend for each case; print what each case gave as JSON.

    python gpu_step.py WEBUI_ROOT DATA_DIR CHECKPOINT

On a GPU the WebUI keeps the model on `devices.device` with `shared.device` the same, makes its token ids
there (sd_hijack_clip), keeps `alphas_cumprod` there in fp32, and (without --no-half) holds the UNet, text
encoder and VAE in fp16 with `devices.dtype*` fp16 and its `devices.autocast()` CUDA's autocast. Each of
those is set here as the WebUI sets it, with meta for CUDA; its GPU probe `cuda_no_autocast` answers as a
GPU that autocasts. The job's own steps follow (jobs.start, run_job): the backend on `shared.sd_model`,
`mixed_precision_for`, the job's begin (LoRAs released, attention optimisations undone), the trainer with
the job's accelerator; its `_start` and one step run (meta_cuda.run_one_step).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CROPS = ("center", "random", "bucket")
#: case name -> (the WebUI's weights: fp32 with --no-half, else fp16; the mixed precision the job asks for)
PRECISIONS = {"fp32": ("fp32", "no"), "fp16": ("fp16", "no"), "fp16-bf16": ("fp16", "bf16")}


def _photos(crop: str) -> list:
    """Three subject photos through the core's preparation at 64 px (an 80x48 bucket for crop="bucket")."""
    import numpy as np
    from PIL import Image

    from dreambooth_core.dataset import prepare_dataset

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (64, 112, 3), dtype=np.uint8)) for _ in range(3)]
    return prepare_dataset(images, token="sks", class_noun="ball", resolution=64, crop=crop, flip=True).items


def _class_images() -> list:
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    return [SimpleNamespace(image=Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                            caption="a photo of a ball") for _ in range(2)]


def _on_meta(half: bool) -> None:
    """The loaded model as the WebUI holds it on a GPU, with meta for CUDA (sd_models.load_model_weights:
    half() but alphas_cumprod, then the model and apply_alpha_schedule_override's ᾱ on the device)."""
    import torch
    from modules import devices, shared

    meta = torch.device("meta")
    model = shared.sd_model
    alphas = model.alphas_cumprod
    model.alphas_cumprod = None
    if half:
        model.half()
    model.to(meta)
    model.alphas_cumprod = alphas.to(meta)
    devices.device = shared.device = meta
    dtype = torch.float16 if half else torch.float32
    devices.dtype = devices.dtype_vae = devices.dtype_unet = devices.dtype_inference = dtype
    shared.cmd_opts.no_half = not half
    shared.cmd_opts.precision = "autocast" if half else "full"
    devices.cuda_no_autocast = lambda device_id=None: False


def _case(crop: str, requested: str, fingerprint: str) -> dict:
    from dreambooth_a1111.backend import A1111Backend
    from dreambooth_core.config import TrainConfig
    from dreambooth_core.training.accel import make_accelerator, mixed_precision_for
    from dreambooth_core.training.trainer import DreamBoothTrainer
    from meta_cuda import run_one_step
    from modules import shared

    backend = A1111Backend(shared.sd_model, mode="lora")
    # A hash of the UNet's bytes, read back to the host: taken before the weights went to meta (no data).
    backend.base_fingerprint = lambda: fingerprint
    config = TrainConfig(class_noun="ball", output_dir="unused", batch_size=2, flip=True, crop=crop, resolution=64,
                         mixed_precision=requested)
    config.mixed_precision = mixed_precision_for(config.mixed_precision, backend.weight_dtype, backend.device)
    backend.begin_job(False)
    try:
        trainer = DreamBoothTrainer(backend, config, _photos(crop), _class_images(),
                                    accelerator=make_accelerator(config, backend.device, reset=True))
        run = run_one_step(trainer)
    finally:
        backend.release()
        backend.end_job(False)
    return {"device": str(backend.device), "weights": str(backend.weight_dtype),
            "mixed_precision": config.mixed_precision,
            "latent_sizes": sorted({tuple(b.latents.shape[-2:]) for b in run.inst + run.cls}),
            "latent_devices": sorted({str(b.latents.device) for b in run.inst + run.cls})}


def main(root: str, data_dir: str, checkpoint: str) -> dict:
    sys.argv = [sys.argv[0], "--data-dir", data_dir, "--ckpt", checkpoint, "--skip-torch-cuda-test", "--use-cpu", "all",
                "--no-half", "--precision", "full", "--skip-load-model-at-start", "--nowebui", "--api"]
    sys.path[:0] = [root, str(REPO), str(REPO / "scripts"), str(REPO / "tests")]
    os.chdir(root)
    from modules import initialize

    initialize.imports()
    initialize.initialize()
    from dreambooth_core.adapters.metadata import weights_fingerprint
    from modules import sd_hijack, shared

    model = shared.sd_model  # loads the checkpoint, as the API start's thread does
    if sd_hijack.current_optimizer is None:
        sd_hijack.apply_optimizations()
    fingerprint = weights_fingerprint(model.model.diffusion_model.state_dict())
    results = {}
    for name, (weights, requested) in PRECISIONS.items():  # fp32 first: meta weights cannot become fp32 again
        _on_meta(half=weights == "fp16")
        for crop in CROPS:
            try:
                results[f"{name}-{crop}"] = _case(crop, requested, fingerprint)
            except Exception:  # reported per case by the test
                results[f"{name}-{crop}"] = {"error": traceback.format_exc()}
    return results


if __name__ == "__main__":
    print("GPU-STEP " + json.dumps(main(*sys.argv[1:4])))
