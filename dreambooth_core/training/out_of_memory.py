"""A training step that does not fit in the accelerator's memory: which error that is on this torch,
and what the user can change, read off the run's own settings (only the levers still open)."""
from __future__ import annotations

from typing import Tuple, Type

import torch

from ..config import TrainConfig

#: what torch raises when an allocation fails (torch.OutOfMemoryError from 2.5; the CUDA one before)
OOM_ERRORS: Tuple[Type[BaseException], ...] = tuple(
    {e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if e})


class TrainingOutOfMemory(RuntimeError):
    pass


def levers(config: TrainConfig, prior: bool) -> list:
    """The memory settings of this run that can still give, most effective first."""
    c = config
    out = []
    if c.gradient_checkpointing == "off":
        out.append("turn gradient_checkpointing on (--gradient-checkpointing)")
    if prior and c.prior_pass == "joint":
        out.append("set prior_pass to separate (--prior-pass separate: the same result, about half the activations)")
    if c.batch_size > 1:
        out.append(f"lower batch_size (now {c.batch_size}; gradient_accumulation keeps the effective batch)")
    if c.train_text_encoder:
        out.append("train without the text encoder (train_text_encoder off)")
    if c.optimizer == "adamw":
        out.append("use optimizer adafactor (--optimizer adafactor)")
    if c.mode == "full":
        out.append("train a LoRA instead of the full model (mode lora)")
    out.append("lower the resolution" + (f" (now {c.resolution})" if c.resolution else ""))
    out.append("keep the base model in fp8 where the host loads it so (ComfyUI: Load Diffusion Model, weight_dtype "
               "fp8_e4m3fn)")
    return out


def message(config: TrainConfig, prior: bool, step: int, checkpoint) -> str:
    kept = f"the last finished step ({step}) is kept in {checkpoint}" if checkpoint else "nothing was trained yet"
    return (f"the accelerator ran out of memory in training step {step + 1}; {kept}. To fit: "
            + "; ".join(levers(config, prior)) + ". Then train again with resume on.")
