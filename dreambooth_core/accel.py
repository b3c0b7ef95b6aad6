"""accelerate inside a long-lived host process (a UI server that trains more than once)."""
from __future__ import annotations

import torch


def fresh_accelerator(device: torch.device):
    """An accelerate.Accelerator for one run in a process that may already have made one.

    accelerate keeps AcceleratorState / GradientState as process-wide singletons: a second
    Accelerator with other settings (device, precision) raises, and a host or another extension
    may have initialised them. Each run resets them, then creates its own (single process,
    no mixed precision: the host decides the dtypes). Works with accelerate 0.21 (the WebUI's pin)
    and newer."""
    import accelerate.state as state
    from accelerate import Accelerator

    for cls, args in ((getattr(state, "AcceleratorState", None), (True,)), (getattr(state, "GradientState", None), ())):
        reset = getattr(cls, "_reset_state", None)
        if reset is None:
            continue
        try:
            reset(*args)
        except TypeError:  # older accelerate: _reset_state() takes no argument
            reset()
    return Accelerator(mixed_precision="no", cpu=torch.device(device).type == "cpu", device_placement=False)
