"""LoRA (Hu et al., 2021): ΔW = up · down of rank r; on a Conv2d base the down projection keeps
the base's kernel (LoCon: kohya's LoRA on res-block convolutions). File keys `lora_down.weight`,
`lora_up.weight`, `alpha`: what ComfyUI's LoraLoader, the WebUI and diffusers read."""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from .base import Adapter, LoRAError, register


@register("lora")
class LoRAModule(Adapter):
    """`up` starts at zero, so training starts at the base model exactly."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__(rank, alpha)
        if isinstance(base, nn.Linear):
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
        device = base.weight.device
        self.to(device=device if device.type != "meta" else "cpu", dtype=torch.float32)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))

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
