"""The optimizer of a run, by name: AdamW (the default), AdamW with 8-bit state (bitsandbytes, where
installed: a quarter of AdamW's state memory), or Adafactor (factored second moments: for an n×m
weight n + m numbers instead of 2·n·m; no extra package, it ships with transformers)."""
from __future__ import annotations

from typing import List

import torch

from ..config import OPTIMIZERS


class OptimizerUnavailable(ValueError):
    pass


def check_available(name: str) -> None:
    """Refuse, before any work, an optimizer whose library is missing; the message says what to do."""
    if name not in OPTIMIZERS:
        raise OptimizerUnavailable(f"optimizer {name!r}: choose one of {OPTIMIZERS}")
    if name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise OptimizerUnavailable(
                "optimizer adamw8bit: needs the bitsandbytes package, which is not installed (pip install "
                "bitsandbytes; it runs on CUDA GPUs). Use adafactor for a low-memory optimizer that needs "
                "nothing more, or adamw.") from None


def make_optimizer(name: str, groups: List[dict], weight_decay: float) -> torch.optim.Optimizer:
    """`groups`: torch parameter groups, each with its own "lr" (UNet, text encoders)."""
    check_available(name)
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # The run's learning rate and schedule, not Adafactor's own relative step sizes.
        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=weight_decay)
    if _all_on_cpu(groups):
        # One kernel over every tensor instead of about ten ops per tensor (a few ms per step with a
        # LoRA's hundreds of small tensors); the same update up to float rounding. Older torch has no
        # CPU kernel and refuses at construction.
        try:
            return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
        except RuntimeError:
            pass
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def _all_on_cpu(groups: List[dict]) -> bool:
    return all(p.device.type == "cpu" for g in groups for p in g["params"])
