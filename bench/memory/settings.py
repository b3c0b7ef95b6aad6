"""The memory levers, as rows of the table: what each keeps on the GPU and how a user turns it on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    base: str = "bf16"  # frozen base weights: fp32 | bf16 | fp8 (stored 1 byte/param, computed in bf16)
    checkpointing: str = "off"  # config.GRADIENT_CHECKPOINTING
    optimizer: str = "adamw"  # config.OPTIMIZERS
    encoders_on_gpu: bool = False  # VAE + text encoders stay resident during the steps
    prior: bool = True  # batch 1 instance + 1 class image (else 1 instance image)
    prior_pass: str = "joint"  # config.PRIOR_PASSES: "separate" runs the class image's forward after the instance's backward
    lora_targets: str = "transformer"  # config.LORA_TARGETS: kohya's set, or "attention" (the GPU run's rows)
    option: str = ""  # how a user gets it

    @property
    def autocast(self) -> bool:
        """Mixed precision: the trainer's autocast in bf16 whenever the base is not fp32."""
        return self.base != "fp32"

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.base == "fp32" else torch.bfloat16

    @property
    def storage_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[self.base]


def sd_settings() -> List[Setting]:
    """SD1.5 / SDXL through the standalone trainer (`python -m dreambooth_core train`)."""
    return [
        Setting("fp32", "fp32, encoders kept", base="fp32", encoders_on_gpu=True,
                option="--mixed-precision no, with previews (sample_every) the encoders stay"),
        Setting("bf16", "bf16 base, encoders off", option="--mixed-precision bf16 (train frees VAE/TE after caching)"),
        Setting("bf16-kept", "bf16 base, encoders kept", encoders_on_gpu=True,
                option="--mixed-precision bf16 --sample-every N (previews keep them)"),
        Setting("gc-hires", "+ checkpointing attention-hires", checkpointing="attention-hires",
                option="--gradient-checkpointing attention-hires"),
        Setting("gc-attn", "+ checkpointing attention", checkpointing="attention",
                option="--gradient-checkpointing attention"),
        Setting("gc-full", "+ checkpointing full", checkpointing="full", option="--gradient-checkpointing full"),
        Setting("gc-full-adafactor", "+ full + Adafactor", checkpointing="full", optimizer="adafactor",
                option="--gradient-checkpointing full --optimizer adafactor"),
        Setting("gc-full-8bit", "+ full + AdamW8bit", checkpointing="full", optimizer="adamw8bit",
                option="--gradient-checkpointing full --optimizer adamw8bit"),
    ]


def flux_settings() -> List[Setting]:
    """Flux through the ComfyUI flow path (checkpointing as the Train node sets it; encoders are the host's)."""
    return [
        Setting("bf16-nogc", "bf16 base, no checkpointing", option="ComfyUI, bf16 model, gradient_checkpointing off"),
        Setting("bf16", "bf16 base, checkpointing", checkpointing="full",
                option="ComfyUI, bf16 model, gradient_checkpointing on"),
        Setting("fp8", "fp8 base, checkpointing", base="fp8", checkpointing="full",
                option="ComfyUI: Load Diffusion Model, weight_dtype fp8_e4m3fn (trains as loaded)"),
        Setting("fp8-adafactor", "fp8 base + Adafactor", base="fp8", checkpointing="full", optimizer="adafactor",
                option="fp8 as above; optimizer=adafactor"),
        Setting("fp8-separate", "fp8 base, prior in a separate pass", base="fp8", checkpointing="full",
                prior_pass="separate", option="fp8 as above; Train node prior_pass separate"),
        Setting("fp8-noprior", "fp8 base, no prior (batch 1)", base="fp8", checkpointing="full", prior=False,
                option="fp8 as above; prior off"),
    ]


def settings_for(kind: str) -> List[Setting]:
    return flux_settings() if kind == "flux" else sd_settings()


# Targets of issue 33 (GiB of GPU memory), per real family, for LoRA + prior at the family's resolution.
TARGETS_GIB: Dict[str, float] = {"sd15": 4.0, "sdxl": 10.0, "flux": 16.0}
