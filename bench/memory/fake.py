"""Full-size models without their memory: built on the meta device, then given fake CPU tensors.

Fake tensors carry shapes, dtypes and a device but no data, so the step runs through autograd,
autocast, checkpointing and the optimizer as it would for real. Two things this torch build forces:
`Module.to` cannot move fake parameters (it swaps them, and the fake mode's memo keeps a weakref),
so models are built on `meta` and their tensors replaced in place; and a CPU-only build has no CUDA
autocast, so CPU autocast runs and `cuda_autocast_norms` adds what CUDA's autocast does differently
where it matters for memory: group and layer norms run in fp32 and return fp32."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

DEVICE = torch.device("cpu")


def fake_mode() -> FakeTensorMode:
    # Real CPU tensors (a schedule's ᾱ table, a CPU generator's draws) may meet fake ones.
    return FakeTensorMode(allow_non_fake_inputs=True)


def _fake(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    meta = t if t.device.type == "meta" else t.detach().to("meta")
    return mode.fake_tensor_converter.from_meta_and_device(mode, meta, DEVICE)


def make_fake(modules: Iterable[nn.Module], mode: FakeTensorMode) -> None:
    """Replace every parameter and buffer (meta or real) of `modules` by a fake CPU tensor of the
    same shape, dtype and requires_grad, keeping the Parameter objects' places in the modules."""
    for root in modules:
        for module in root.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(_fake(mode, p), requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = _fake(mode, b)


def build_on_meta(factory, dtype: torch.dtype):
    """`factory()` with its tensors on the meta device in `dtype` (no memory, no init cost)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return factory()
    finally:
        torch.set_default_dtype(previous)


class _Fp32Norms(TorchFunctionMode):
    """Under autocast, group_norm / layer_norm take fp32 inputs and return fp32, as CUDA's autocast
    does (its fp32 list); CPU autocast runs them in the input's dtype."""

    NORMS = {F.group_norm: 0, F.layer_norm: 0, torch.group_norm: 0, torch.layer_norm: 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.NORMS and torch.is_autocast_enabled("cpu"):
            up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            kw = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return func(*up, **kw)
        return func(*args, **kwargs)


@contextmanager
def cuda_autocast_norms(enabled: bool, modules: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Norms as CUDA's autocast runs them, in the step and in checkpointing's recomputation, which
    runs in the backward pass where torch-function modes are not active: diffusers' checkpointed
    modules get a `context_fn` that enters the same mode around their recomputation."""
    if not enabled:
        yield
        return
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    recompute = partial(checkpoint, use_reentrant=False, context_fn=lambda: (_Fp32Norms(), _Fp32Norms()))
    patched = []
    for root in modules:
        for m in root.modules():
            if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
                patched.append((m, m._gradient_checkpointing_func))
                m._gradient_checkpointing_func = recompute
    try:
        with _Fp32Norms():
            yield
    finally:
        for m, func in patched:
            m._gradient_checkpointing_func = func
