"""LoRA (Hu et al., 2021): ΔW = up · down of rank r; on a Conv2d base the down projection keeps
the base's kernel (LoCon: kohya's LoRA on res-block convolutions). File keys `lora_down.weight`,
`lora_up.weight`, `alpha`: what ComfyUI's LoraLoader, the WebUI and diffusers read."""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from .base import Adapter, LoRAError, register


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or a host's own Linear class that is not one (Forge's `ForgeOperations.Linear`
    subclasses nn.Module): `in_features`, `out_features` and a 2-D weight of that shape."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.ndim == 2 and
            tuple(weight.shape) == (getattr(module, "out_features", None), getattr(module, "in_features", None)))


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for tensors of `device_type`; off for a device it does not cover (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


@register("lora")
class LoRAModule(Adapter):
    """`up` starts at zero, so training starts at the base model exactly."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__(rank, alpha)
        if is_linear_like(base):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                       base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise LoRAError(f"LoRA attaches to Linear or Conv2d modules, not {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        # On the base's device, meta too: a model whose weights only claim a device (the tests' stand-in
        # for CUDA, the memory estimate's fakes) gets adapters that claim it as well.
        self.to(device=base.weight.device, dtype=torch.float32)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the down projection casts its input itself; casting here first would give
        # every adapter its own saved copy of the input (q, k and v: three) instead of sharing it.
        if not autocast_on(x.device.type):
            x = x.to(self.lora_down.weight.dtype)
        return self.lora_up(self.lora_down(x))

    def weight_delta(self) -> torch.Tensor:
        up, down = self.lora_up.weight, self.lora_down.weight
        if down.ndim == 2:
            return (up @ down) * self.scale
        return torch.einsum("or,rikl->oikl", up.flatten(1), down) * self.scale

    def file_tensors(self, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down.weight.detach().to("cpu", dtype),
                "lora_up.weight": self.lora_up.weight.detach().to("cpu", dtype),
                "alpha": torch.tensor(self.alpha, dtype=dtype)}

    @torch.no_grad()
    def load_file_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.lora_down.weight.copy_(tensors["lora_down.weight"])
        self.lora_up.weight.copy_(tensors["lora_up.weight"])
