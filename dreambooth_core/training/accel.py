"""The one place that makes an accelerate.Accelerator for a run, so every host gets the run's
gradient accumulation and mixed precision (a host that ignored them took every micro-step as a full
optimizer step with an undivided loss)."""
from __future__ import annotations

from typing import Optional

import torch


def make_accelerator(config, device: Optional[torch.device] = None, *, reset: bool = False):
    """An Accelerator with `config.gradient_accumulation` and `config.mixed_precision`.

    `device` None: accelerate picks it (the CLI, where `accelerate launch` may start several
    processes; cpu=True on machines without an accelerator lets `--multi_gpu` run data-parallel CPU
    processes over gloo). A given device: the models already live there and stay (no placement).
    `reset`: for long-lived host processes (a UI server that trains more than once): accelerate keeps
    AcceleratorState / GradientState as process-wide singletons, so a second Accelerator with other
    settings raises, and a host or another extension may have initialised them; reset them first."""
    from accelerate import Accelerator

    if reset:
        _reset_state()
    settings = dict(gradient_accumulation_steps=config.gradient_accumulation, mixed_precision=config.mixed_precision)
    if device is None:
        no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        return Accelerator(**settings, cpu=no_accelerator)
    return Accelerator(**settings, cpu=torch.device(device).type == "cpu", device_placement=False)


def mixed_precision_for(requested: str, weight_dtype: torch.dtype, device) -> str:
    """The precision a run needs when a host holds the frozen base in half precision on an
    accelerator (the WebUI's default fp16 UNet): without autocast its activations and gradients
    stay fp16 with no loss scaling, so small LoRA gradients underflow to zero. Autocast in the
    base's dtype ("fp16" also scales the loss) keeps the fp32 LoRA weights and their updates
    exact. A precision the user asked for, and CPU runs, are left as they are."""
    if requested != "no" or torch.device(device).type == "cpu":
        return requested
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weight_dtype, "no")


def _reset_state() -> None:
    """Works with accelerate 0.21 (the WebUI's pin) and newer."""
    import accelerate.state as state

    for cls, args in ((getattr(state, "AcceleratorState", None), (True,)), (getattr(state, "GradientState", None), ())):
        reset = getattr(cls, "_reset_state", None)
        if reset is None:
            continue
        try:
            reset(*args)
        except TypeError:  # older accelerate: _reset_state() takes no argument
            reset()
