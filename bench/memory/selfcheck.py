"""The estimator checked against a measurement: reduced models of each layout train one real step on
the CPU (`measure.measured_peak`, the allocator's own count), and the same step is predicted over
fake tensors. Both use CPU autocast here (no fp32-norm emulation), so they describe the same run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from . import architectures, estimate, measure
from .settings import Setting

TOLERANCE = 0.15

CHECKS = {
    "sd15": [Setting("fp32", "fp32, AdamW", base="fp32"),
             Setting("bf16-attn-ada", "bf16, ckpt attention, Adafactor", checkpointing="attention", optimizer="adafactor"),
             Setting("bf16-full", "bf16, ckpt full", checkpointing="full")],
    "sdxl": [Setting("fp32", "fp32, AdamW", base="fp32"),
             Setting("bf16-hires", "bf16, ckpt attention-hires", checkpointing="attention-hires")],
    "flux": [Setting("bf16", "bf16, no ckpt"),
             Setting("fp8-full", "fp8, ckpt", base="fp8", checkpointing="full")],
}
QUICK = {"sd15": CHECKS["sd15"][:2], "flux": CHECKS["flux"][1:]}


@dataclass
class Check:
    model: str
    setting: str
    predicted: int
    measured: int

    @property
    def ratio(self) -> float:
        """measured / predicted"""
        return self.measured / self.predicted

    @property
    def ok(self) -> bool:
        return abs(self.ratio - 1.0) <= TOLERANCE


def run_checks(quick: bool = False, log=print) -> List[Check]:
    specs = architectures.reduced_specs()
    out = []
    for key, settings in (QUICK if quick else CHECKS).items():
        for setting in settings:
            predicted = estimate.predict(specs[key], setting, cuda_norms=False).peak
            measured = measure.measured_peak(specs[key], setting)
            out.append(Check(specs[key].label, setting.label, predicted, measured))
            log(f"  self-check {specs[key].label}, {setting.label}: measured/predicted {out[-1].ratio:.3f}")
    return out
