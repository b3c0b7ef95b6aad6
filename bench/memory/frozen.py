"""The frozen Linears of a flow transformer as our ComfyUI flow path runs them: the weight is read
(cast to the compute dtype) in forward and read again in backward, nothing else is saved, so a
frozen Linear keeps no activation and no weight copy. An fp8 base is the same with the weights
stored at 1 byte per parameter (float8_e4m3fn) and computed in bf16."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Recast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        y = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        # A view returned from a custom Function cannot take the adapter's in-place add; the host's
        # path adds the LoRA out of place, which costs the same one output-sized temporary.
        return y if y._base is None else y.clone()

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad.to(ctx.dtype) @ weight.to(ctx.dtype), None, None, None


def recast_linears(root: nn.Module, compute_dtype: torch.dtype, storage_dtype: torch.dtype | None = None) -> int:
    """Patch every nn.Linear under `root` (before LoRA is attached, as the host's path sits under
    the adapter); `storage_dtype` (float8_e4m3fn) re-stores its frozen weight. Returns how many."""
    count = 0
    for module in root.modules():
        if not isinstance(module, nn.Linear):
            continue
        if storage_dtype is not None:
            w = module.weight
            module.weight = nn.Parameter(torch.empty(w.shape, dtype=storage_dtype, device=w.device),
                                         requires_grad=False)
        module.forward = (lambda m: lambda x: _Recast.apply(x, m.weight, m.bias, compute_dtype))(module)
        count += 1
    return count
