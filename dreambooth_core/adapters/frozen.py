"""Frozen Linears and convolutions that pass gradients on without keeping or copying their weights,
with a LoRA added to their output: how a backend trains adapters on a host's loaded model whose
weights are inference tensors (made under `torch.inference_mode`, as Forge's and ComfyUI's loaders
make them). Autograd cannot save such a tensor for backward, and F.linear saves its weight to pass
the gradient to its input; the usual way round, a fresh copy of each weight per forward, keeps a
second copy of every weight alive until backward. Here the host's own forward runs unrecorded, and
backward reads the weight again through `read_weight(module, like)` (the host's cast: its dtype,
device and scale, as the forward saw it) to compute dL/dx. The frozen weights never get a gradient.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .lora import is_linear_like

#: read_weight(module, like) -> the module's weight as its forward uses it, cast to `like`'s device and dtype
WeightReader = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def plain_weight(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    return module.weight.to(device=like.device, dtype=like.dtype)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, host_forward, read_weight):
        ctx.module, ctx.read_weight, ctx.x_dtype = module, read_weight, x.dtype
        return host_forward(x)

    @staticmethod
    def backward(ctx, grad):
        with torch.no_grad():
            return (grad @ ctx.read_weight(ctx.module, grad)).to(ctx.x_dtype), None, None, None


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module, host_forward, read_weight):
        ctx.module, ctx.read_weight, ctx.x_dtype, ctx.x_shape = module, read_weight, x.dtype, x.shape
        return host_forward(x)

    @staticmethod
    def backward(ctx, grad):
        m = ctx.module
        with torch.no_grad():
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, ctx.read_weight(m, grad), grad, m.stride, m.padding,
                                            m.dilation, m.groups)
        return gx.to(ctx.x_dtype), None, None, None


def frozen_patchable(module: nn.Module) -> bool:
    """A Linear (or a host's Linear-like class) or a zero-padded Conv2d whose weight is a plain tensor
    (a quantized weight is some other tensor type, whose forward is the host's own business)."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return False
    elif not is_linear_like(module):
        return False
    return type(getattr(module, "weight", None)) in (torch.Tensor, nn.Parameter)


class FrozenState:
    """A switch shared by one run's patched forwards, for hosts that sample through the same modules
    with the deltas elsewhere (ComfyUI's result MODEL carries them as weight wrappers): off, each
    patched forward is the host's own."""

    def __init__(self) -> None:
        self.active = True


class FrozenForward:
    """The forward a frozen Linear or Conv2d runs while adapters train: the host's forward, dL/dx from
    the weight read again in backward, plus the LoRA's up(down(x))·scale where one is attached (no
    W + ΔW is made). Install it as the module's instance `forward`; without grad (sampling) it is
    the host's forward plus the LoRA, or the host's alone while `state` is off."""

    def __init__(self, module: nn.Module, adapter: Optional[nn.Module] = None,
                 read_weight: WeightReader = plain_weight, state: Optional[FrozenState] = None):
        self.module, self.adapter, self.read_weight, self.state = module, adapter, read_weight, state
        self.host_forward = module.forward  # bound: the class's forward or a previous instance patch
        self.op = _FrozenConv2d if isinstance(module, nn.Conv2d) else _FrozenLinear

    def __call__(self, x, *args, **kwargs):
        if args or kwargs or (self.state is not None and not self.state.active):
            return self.host_forward(x, *args, **kwargs)
        if torch.is_grad_enabled() and x.requires_grad:
            y = self.op.apply(x, self.module, self.host_forward, self.read_weight)
        else:
            y = self.host_forward(x)
        if self.adapter is not None:
            y = y + self.adapter.delta(x).to(y.dtype) * self.adapter.scale
        return y
