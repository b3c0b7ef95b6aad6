"""What every adapter is: a small trainable module beside a frozen base module, whose output it
extends, registered by name so a new kind (LoHa, LoKr, ...) is one more small file."""
from __future__ import annotations

from typing import Callable, Dict, Type

import torch
from torch import nn

#: the attribute under which an adapter hangs on its base module (a child module: wrappers such as
#: DDP see its parameters; `hasattr(base, ADAPTER_ATTR)` tells whether one is attached)
ADAPTER_ATTR = "dreambooth_lora"

ADAPTERS: Dict[str, Type["Adapter"]] = {}


class LoRAError(ValueError):
    pass


def register(name: str) -> Callable[[Type["Adapter"]], Type["Adapter"]]:
    def add(cls: Type["Adapter"]) -> Type["Adapter"]:
        cls.name = name
        ADAPTERS[name] = cls
        return cls
    return add


def make_adapter(kind: str, base: nn.Module, rank: int, alpha: float) -> "Adapter":
    if kind not in ADAPTERS:
        raise LoRAError(f"adapter {kind!r}: choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[kind](base, rank, alpha)


class Adapter(nn.Module):
    """y = base(x) + scale · delta(x), with scale = alpha / rank · multiplier. Subclasses give
    `delta`, the full-size `weight_delta` (for hosts that patch weights instead of forwards) and
    their tensors by file-key suffix (`file_tensors` / `load_file_tensors`)."""

    name = "adapter"

    def __init__(self, rank: int, alpha: float):
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.multiplier = 1.0
        self._base_forward = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank * self.multiplier

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_delta(self) -> torch.Tensor:
        """ΔW, shaped like the base weight, scale included."""
        raise NotImplementedError

    def file_tensors(self, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_file_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The scaled update is added into the base output in place, in one pass: neither a Linear's
        # nor a Conv2d's backward needs its output, and it saves two activation-sized temporaries
        # per adapted module on every forward.
        out = self._base_forward(x, *args, **kwargs)
        return out.add_(self.delta(x).to(out.dtype), alpha=self.scale)

    def attach(self, base: nn.Module) -> None:
        """Route base's forward through this adapter, which becomes a child module of its base."""
        if hasattr(base, ADAPTER_ATTR):
            raise LoRAError("this module already carries a DreamBooth LoRA; detach it first")
        self._base_forward = base.forward
        base.add_module(ADAPTER_ATTR, self)
        base.forward = self.forward

    def detach_from(self, base: nn.Module) -> None:
        if getattr(base, ADAPTER_ATTR, None) is self:
            del base._modules[ADAPTER_ATTR]
            del base.forward
        self._base_forward = None
