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

from .lora import LoRAModule, autocast_on, is_linear_like

#: read_weight(module, like) -> the module's weight as its forward uses it, cast to `like`'s device and dtype
WeightReader = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def plain_weight(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    return module.weight.to(device=like.device, dtype=like.dtype)


def _conv_input_grad(module: nn.Conv2d, x_shape: torch.Size, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dx of a convolution. As torch.nn.grad.conv2d_input, but the input it passes for its shape is
    an empty tensor, not an expanded one, which the kernel would first copy into a contiguous one."""
    return torch.ops.aten.convolution_backward(
        grad, grad.new_empty(x_shape), weight, None, list(module.stride), list(module.padding),
        list(module.dilation), False, [0, 0], module.groups, (True, False, False))[0]


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
        with torch.no_grad():
            gx = _conv_input_grad(ctx.module, ctx.x_shape, ctx.read_weight(ctx.module, grad), grad)
        return gx.to(ctx.x_dtype), None, None, None


def _pointwise_lora(adapter: Optional[nn.Module]) -> bool:
    """A LoRA whose two projections act on channels only (Linears, or 1×1 convolutions without
    stride, padding or groups): each is one matrix, so _FrozenLoRA can run them."""
    if not isinstance(adapter, LoRAModule):
        return False
    down = adapter.lora_down
    return not isinstance(down, nn.Conv2d) or (
        down.kernel_size == (1, 1) and down.stride == (1, 1) and down.padding == (0, 0) and
        down.dilation == (1, 1) and down.groups == 1)


class _FrozenLoRA(torch.autograd.Function):
    """A frozen Linear or convolution and its pointwise LoRA as one autograd node:
    y = host(x) + s·U·D·x with D (rank × in) and U (out × rank). Against a node per projection, the
    scaling and the sum, it makes no activation-sized temporary (the update goes into the host's
    output in place, dL/dx of the LoRA into the frozen one's), and it orders each rank-sized product
    the way the CPU's GEMM runs it fast (autograd's own order for dL/dU, a transposed activation
    times a skinny matrix, was up to 10× slower). A Linear's activations are rows (tokens × channels),
    a convolution's are channels × pixels for each image."""

    @staticmethod
    def forward(ctx, x, down, up, module, host_forward, read_weight, scale):
        conv = down.ndim == 4
        ctx.module, ctx.read_weight, ctx.scale, ctx.conv = module, read_weight, scale, conv
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        y = host_forward(x)
        # The sum goes into the host's output in place, unless that is a view (F.linear of a 3-D input):
        # returned from a custom Function, a view refuses the in-place updates hosts make to it later
        # (Forge's transformer block: x += attn(x)), so then into a tensor of its own.
        out = y if y._base is None else torch.empty(y.shape, dtype=y.dtype, device=y.device)
        d, u = (down.flatten(1), up.flatten(1)) if conv else (down, up)
        xl = x.to(d.dtype)
        if conv:  # each image's activations as a matrix: channels × pixels
            xm = xl.reshape(x.shape[0], x.shape[1], -1)
            hs = torch.matmul(d, xm).mul_(scale)                          # B × r × HW
            ym, om = y.reshape(y.shape[0], y.shape[1], -1), out.view(y.shape[0], y.shape[1], -1)
            if y.dtype == u.dtype:
                torch.baddbmm(ym, u.expand(ym.shape[0], -1, -1), hs, out=om)
            else:
                torch.add(ym, torch.matmul(u, hs).to(y.dtype), out=om)
        else:  # tokens × channels
            xm = xl.reshape(-1, x.shape[-1])
            hs = xm.mm(d.t()).mul_(scale)                                 # tokens × r
            ym, om = y.reshape(-1, y.shape[-1]), out.view(-1, y.shape[-1])
            if y.dtype == u.dtype:
                torch.addmm(ym, hs, u.t(), out=om)
            else:
                torch.add(ym, hs.mm(u.t()).to(y.dtype), out=om)
        ctx.save_for_backward(xm, hs, down, up)
        return out

    @staticmethod
    def backward(ctx, grad):
        xm, hs, down, up = ctx.saved_tensors
        conv = ctx.conv
        d, u = (down.flatten(1), up.flatten(1)) if conv else (down, up)
        need_x, need_d, need_u = ctx.needs_input_grad[:3]
        gd = gu = gx = None
        with torch.no_grad():
            gl = grad.to(u.dtype)
            if conv:
                gm = gl.reshape(gl.shape[0], gl.shape[1], -1)               # B × out × HW
                ghs = torch.matmul(u.t(), gm).mul_(ctx.scale)               # B × r × HW
                if need_u:
                    gu = torch.bmm(hs, gm.transpose(1, 2)).sum(0).t().reshape(up.shape)
                if need_d:
                    gd = torch.bmm(ghs, xm.transpose(1, 2)).sum(0).view_as(down)
                if need_x:  # a 1×1 convolution's dL/dx is a product too (the CPU's conv kernel copies more)
                    gxm = torch.matmul(ctx.read_weight(ctx.module, grad).flatten(1).t(), grad.reshape(gm.shape))
                    if gxm.dtype == d.dtype:
                        gxm.baddbmm_(d.t().expand(gxm.shape[0], -1, -1), ghs)
                    else:
                        gxm.add_(torch.matmul(d.t(), ghs).to(gxm.dtype))
                    gx = gxm.view(ctx.x_shape)
            else:
                gm = gl.reshape(-1, gl.shape[-1])                            # tokens × out
                ghs = u.t().mm(gm.t()).t().mul_(ctx.scale)                  # tokens × r
                if need_u:
                    gu = hs.t().mm(gm).t()
                if need_d:
                    gd = ghs.t().mm(xm)
                if need_x:
                    gx = grad @ ctx.read_weight(ctx.module, grad)
                    gxm = gx.view(-1, gx.shape[-1])
                    if gx.dtype == d.dtype:
                        gxm.addmm_(ghs, d)
                    else:
                        gxm.add_(ghs.mm(d).to(gx.dtype))
            if gx is not None:
                gx = gx.to(ctx.x_dtype)
        return gx, gd, gu, None, None, None, None


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
    W + ΔW is made; a Linear's or 1×1 convolution's LoRA in the same autograd node, _FrozenLoRA). Install it as the module's instance `forward`; without grad (sampling) it is
    the host's forward plus the LoRA, or the host's alone while `state` is off."""

    def __init__(self, module: nn.Module, adapter: Optional[nn.Module] = None,
                 read_weight: WeightReader = plain_weight, state: Optional[FrozenState] = None,
                 host_forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.module, self.adapter, self.read_weight, self.state = module, adapter, read_weight, state
        # bound: the class's forward or a previous instance patch, unless the host layer gives an
        # equivalent one (nodes.adapters: torch's own op where ComfyUI's cast would change nothing)
        self.host_forward = host_forward or module.forward
        self.op = _FrozenConv2d if isinstance(module, nn.Conv2d) else _FrozenLinear
        self.pointwise_lora = _pointwise_lora(adapter) and getattr(module, "groups", 1) == 1
        self._last: Optional[tuple] = None  # (input, host output): see _host_for

    def _host_for(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The host's forward; while training on the CPU, for a Linear's input that takes no gradient
        and equals the last one, a copy of its last output instead. The cached caption embeddings reach
        the cross-attention's key and value projections unchanged at every step: their frozen product
        is then made once per run, not once per step (a few hundred kB kept per such module). Not on an
        accelerator, where the comparison would wait for the device, and those products cost little."""
        if not torch.is_grad_enabled() or x.requires_grad or self.op is not _FrozenLinear or \
                x.device.type != "cpu" or autocast_on("cpu"):
            return self.host_forward
        last = self._last
        if last is None or last[0].shape != x.shape or last[0].dtype != x.dtype or \
                last[0].device != x.device or not torch.equal(last[0], x):
            with torch.no_grad():
                self._last = last = (x.detach().clone(), self.host_forward(x))
        return lambda _: last[1].clone()

    def __call__(self, x, *args, **kwargs):
        if args or kwargs or (self.state is not None and not self.state.active):
            return self.host_forward(x, *args, **kwargs)
        host = self._host_for(x)
        if self.pointwise_lora and not autocast_on(x.device.type):
            a = self.adapter
            return _FrozenLoRA.apply(x, a.lora_down.weight, a.lora_up.weight, self.module, host,
                                     self.read_weight, a.scale)
        if torch.is_grad_enabled() and x.requires_grad:
            y = self.op.apply(x, self.module, host, self.read_weight)
        else:
            y = host(x)
        if self.adapter is not None:
            y = y + self.adapter.delta(x).to(y.dtype) * self.adapter.scale
        return y
