"""What the GPU run trains, in which order, and what each row compares.

Few steps on purpose: the whole run (installs included) must finish in under 8 minutes on an H100,
so each row is W warm-up + N measured steps (+ 1 step whose FLOPs are counted, kept out of the
timing) and no class images are sampled (the class folder gets toy-world renders: a step's cost
does not depend on what the class images show)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

MODEL_LABELS = {"sd15": "SD1.5-shaped (random)", "sdxl": "SDXL-shaped (random)",
                "flux": "Flux dev-shaped transformer (random)"}
REFERENCE_SCRIPTS = {"sd15": "train_dreambooth_lora.py", "sdxl": "train_dreambooth_lora_sdxl.py"}
# Our CLI on top of bench/run.py's shared flags: the benchmark's default settings
# (run.OURS_SETTINGS: the reference's LoRA set, selective checkpointing) in bf16, and no sampled
# thumbnail in the saved file (it is after the steps, but costs wall time at 1024 px).
OURS_GPU_FLAGS = ["--thumbnail-steps", "0"]
CLASS_IMAGES = 4  # per model: enough for prior preservation's batch of one class image per step


@dataclass(frozen=True)
class GpuRow:
    """One timed training run: a model, a trainer, a size and its estimator prediction."""

    key: str  # unique, also the child's log name
    model: str  # sd15 | sdxl | flux
    trainer: str  # reference | ours
    resolution: int
    warmup: int
    measure: int
    precision: str  # bf16 (mixed precision / base) | fp8 (frozen base stored in fp8, computed in bf16)
    settings: str  # what runs, in words
    prediction: str  # key of bench/gpu/predictions.json (the estimator's same setting)
    compares: str  # what this row stands beside

    @property
    def steps(self) -> int:
        return self.warmup + self.measure

    @property
    def runner(self) -> str:
        """reference (diffusers' script), ours (our CLI) or flux (bench.gpu_flux: our core's step)."""
        if self.trainer == "reference":
            return "reference"
        return "flux" if self.model == "flux" else "ours"

    @property
    def script(self) -> Optional[str]:
        return REFERENCE_SCRIPTS[self.model] if self.runner == "reference" else None

    @property
    def label(self) -> str:
        return MODEL_LABELS[self.model]


def _sd(model: str, res: int, warmup: int, measure: int) -> List[GpuRow]:
    name = {"sd15": "SD1.5", "sdxl": "SDXL"}[model]
    ref = GpuRow(f"{model}_reference", model, "reference", res, warmup, measure, "bf16",
                 f"{REFERENCE_SCRIPTS[model]} as shipped: --mixed_precision bf16, LoRA rank 4 on "
                 "to_q/to_k/to_v/to_out.0, "
                 "prior preservation (1 + 1 images), no checkpointing (its default), VAE encodes every step",
                 f"{model}:reference", f"{name} baseline: diffusers' own DreamBooth LoRA script")
    ours = GpuRow(f"{model}_ours", model, "ours", res, warmup, measure, "bf16",
                  "python -m dreambooth_core train --mixed-precision bf16 --lora-targets attention "
                  "--gradient-checkpointing attention-hires (bench's default settings), latents and embeddings "
                  "cached, encoders freed", f"{model}:ours", f"against {model}_reference (same data, LoRA set, rank, "
                  "optimizer, precision)")
    return [ref, ours]


def _flux(res: int, warmup: int, measure: int) -> List[GpuRow]:
    common = ("our core's LoRA step (bench.gpu_flux: LoRANetwork rank 4 on the blocks' attention + MLP, flow "
              "schedule, dreambooth_loss, AdamW) on FluxTransformer2DModel with Flux dev's config, every block "
              "checkpointed, prior preservation (1 + 1 latents)")
    no_ref = "no reference run: diffusers' Flux DreamBooth script is not in shared/reference and needs T5-XXL"
    return [GpuRow("flux_ours_bf16", "flux", "ours", res, warmup, measure, "bf16", f"{common}, bf16 base",
                   "flux:bf16", f"the estimator's 'bf16 base, checkpointing' row; {no_ref}"),
            GpuRow("flux_ours_fp8", "flux", "ours", res, warmup, measure, "fp8",
                   f"{common}, fp8 base (float8_e4m3fn Linears, computed in bf16)", "flux:fp8",
                   "against flux_ours_bf16: the estimator's fp8 path run for real")]


def make_plan(quick: bool = False, models: Optional[List[str]] = None) -> List[GpuRow]:
    """The rows in run order: SD1.5, then Flux, then SDXL (its model folder is the slowest to
    write, so a run that hits its time limit loses it last)."""
    if quick:
        rows = _sd("sd15", 512, 1, 3) + _flux(1024, 1, 2) + _sd("sdxl", 1024, 1, 2)
    else:
        rows = _sd("sd15", 512, 3, 10) + _flux(1024, 1, 3) + _sd("sdxl", 1024, 2, 5)
    if models:
        unknown = [m for m in models if m not in MODEL_LABELS]
        if unknown:
            raise SystemExit(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODEL_LABELS)}")
        rows = [r for r in rows if r.model in models]
    return rows
