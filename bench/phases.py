"""Where a training step's time goes, from hooks any trainer passes through (bench.child --phases).

A step runs from the end of the previous optimizer step to the end of its own. Inside it:

- data: until the first module's forward begins (batch assembly, noise, timesteps, conditioning);
- forward: from there until `torch.autograd.backward` is called (forward pass and loss);
- backward: the `torch.autograd.backward` call (every `loss.backward()` goes through it);
- optimizer: `optimizer.step()` (torch's global pre/post step hooks), gradient clipping included
  where a trainer clips inside its step, zero_grad and scheduler are in "other";
- weight wrappers: time inside the functions a ComfyUI trainer registers with
  `ModelPatcher.add_weight_wrapper` (the LoRA deltas W + up·down, and copies of frozen weights),
  measured in the forward pass only; it is part of "forward", shown apart as the LoRA overhead
  the forward pass pays. Their backward share is not separable this way and stays in "backward".

The hooks cost a little time themselves (a global module hook runs on every module call): a run
with --phases is a profile, never a timed row.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

WRAPPER_SECONDS = [0.0]  # shared with the wrapper timer below (module global: one trainer per process)


def timed_wrapper(fn: Callable) -> Callable:
    """`fn` (a weight function) with its time added to WRAPPER_SECONDS."""
    def wrapper(weight, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(weight, *args, **kwargs)
        finally:
            WRAPPER_SECONDS[0] += time.perf_counter() - t0

    return wrapper


def time_comfy_weight_wrappers() -> None:
    """Wrap every function later given to ComfyUI's ModelPatcher.add_weight_wrapper with the timer."""
    import comfy.model_patcher as mp_mod

    original = mp_mod.ModelPatcher.add_weight_wrapper
    if getattr(original, "_bench_timed", False):
        return

    def add_weight_wrapper(self, name, function):
        return original(self, name, timed_wrapper(function))

    add_weight_wrapper._bench_timed = True
    mp_mod.ModelPatcher.add_weight_wrapper = add_weight_wrapper


class PhaseTimer:
    """Per-step seconds in each phase (see the module docstring), from global torch hooks."""

    PHASES = ("data", "forward", "backward", "optimizer", "other", "weight_wrappers")

    def __init__(self) -> None:
        self.steps: List[Dict[str, float]] = []
        self._start = None          # end of the previous optimizer step
        self._first_forward = None
        self._backward = 0.0
        self._backward_start = None
        self._opt_start = None
        self._wrappers_at_start = 0.0

    def install(self) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        timer = self
        original_backward = torch.autograd.backward

        def backward(*args, **kwargs):
            t0 = time.perf_counter()
            if timer._backward_start is None:
                timer._backward_start = t0
            try:
                return original_backward(*args, **kwargs)
            finally:
                timer._backward += time.perf_counter() - t0

        torch.autograd.backward = backward
        self._grad_enabled = torch.is_grad_enabled  # read on every module call: no import there
        torch.nn.modules.module.register_module_forward_pre_hook(self._on_forward)
        register_optimizer_step_pre_hook(self._on_opt_start)
        self._start = time.perf_counter()
        self._wrappers_at_start = WRAPPER_SECONDS[0]

    def _on_forward(self, module, args) -> None:
        if self._first_forward is None and self._grad_enabled():
            self._first_forward = time.perf_counter()

    def _on_opt_start(self, optimizer, args, kwargs) -> None:
        if self._opt_start is None:
            self._opt_start = time.perf_counter()

    def on_step_end(self) -> None:
        """Called from the optimizer post-step hook: closes one step."""
        now = time.perf_counter()
        start = self._start
        first = self._first_forward or start
        bstart = self._backward_start or now
        ostart = self._opt_start or now
        wrappers = WRAPPER_SECONDS[0] - self._wrappers_at_start
        step = {"data": max(0.0, first - start), "forward": max(0.0, bstart - first), "backward": self._backward,
                "optimizer": max(0.0, now - ostart), "weight_wrappers": wrappers, "total": now - start}
        step["other"] = max(0.0, step["total"] - step["data"] - step["forward"] - step["backward"] - step["optimizer"])
        self.steps.append(step)
        self._start, self._first_forward, self._backward, self._backward_start, self._opt_start = now, None, 0.0, None, None
        self._wrappers_at_start = WRAPPER_SECONDS[0]

    def summary(self, skip: int = 1) -> Dict[str, float]:
        """Mean seconds per phase over the steps after the first `skip` (warm-up)."""
        steps = self.steps[skip:] or self.steps
        if not steps:
            return {}
        return {k: sum(s[k] for s in steps) / len(steps) for k in (*self.PHASES, "total")}
