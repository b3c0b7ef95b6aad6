"""The adapters of one run, by kohya name, and how they are put into a model: each wraps the
forward of its target module (hosts that patch weights instead read `weight_delta`)."""
from __future__ import annotations

from typing import Dict, Iterator, Mapping, Optional

import torch
from torch import nn

from . import lora  # noqa: F401  (registers the "lora" adapter)
from .base import Adapter, LoRAError, make_adapter


class LoRANetwork:
    """The set of adapters of one training run, by kohya name."""

    def __init__(self, targets: Mapping[str, nn.Module], rank: int, alpha: Optional[float] = None,
                 ranks: Optional[Mapping[str, int]] = None, alphas: Optional[Mapping[str, float]] = None,
                 kind: str = "lora"):
        if not targets:
            raise LoRAError("the model offers no module to attach a LoRA to")
        self.targets = dict(targets)
        self.adapters: Dict[str, Adapter] = {}
        for name, module in self.targets.items():
            r = (ranks or {}).get(name, rank)
            a = (alphas or {}).get(name, alpha if alpha is not None else r)
            self.adapters[name] = make_adapter(kind, module, r, a)

    def attach(self) -> "LoRANetwork":
        for name, adapter in self.adapters.items():
            adapter.attach(self.targets[name])
        return self

    def detach(self) -> None:
        for name, adapter in self.adapters.items():
            adapter.detach_from(self.targets[name])

    def parameters(self) -> Iterator[nn.Parameter]:
        for adapter in self.adapters.values():
            yield from adapter.parameters()

    def set_multiplier(self, value: float) -> None:
        for adapter in self.adapters.values():
            adapter.multiplier = value

    def state_dict(self, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
        """Every adapter's tensors under `<kohya name>.<suffix>`: the file's layout."""
        return {f"{name}.{suffix}": t for name, adapter in self.adapters.items()
                for suffix, t in adapter.file_tensors(dtype).items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        by_name: Dict[str, Dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():  # kohya names hold no dots: the first one ends the name
            name, _, suffix = key.partition(".")
            by_name.setdefault(name, {})[suffix] = tensor
        for name, adapter in self.adapters.items():
            adapter.load_file_tensors(by_name[name])
