"""LoRA adapters on named Linear/Conv2d modules, and the kohya-style file format.

The file keys are `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha`, where
`<name>` is the kohya name that the backend gives each target module (`lora_unet_…`,
`lora_te_…`). That is the layout stock ComfyUI (`LoraLoader`), Automatic1111's built-in Lora
support and diffusers' `load_lora_weights` all read.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional

import torch
from torch import nn

from . import fileio

ADAPTER_ATTR = "dreambooth_lora"


class LoRAError(ValueError):
    pass


class LoRAModule(nn.Module):
    """y = base(x) + (alpha / rank) · up(down(x)); `up` starts at zero so training starts at the
    base model exactly."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
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
        self.rank = rank
        self.alpha = float(alpha)
        self.multiplier = 1.0
        self._base_forward = None
        device = base.weight.device
        self.to(device=device if device.type != "meta" else "cpu", dtype=torch.float32)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank * self.multiplier

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The scaled update is added into the base output in place, in one pass: neither a Linear's
        # nor a Conv2d's backward needs its output, and it saves two activation-sized temporaries
        # per adapted module on every forward.
        out = self._base_forward(x, *args, **kwargs)
        delta = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return out.add_(delta.to(out.dtype), alpha=self.scale)

    def attach(self, base: nn.Module) -> None:
        """Route base's forward through this adapter. The adapter becomes a child module of its
        base, so wrappers such as DDP see (and synchronise) its parameters."""
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

    def weight_delta(self) -> torch.Tensor:
        """ΔW, shaped like the base weight (for merging into it)."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if down.ndim == 2:
            return (up @ down) * self.scale
        return torch.einsum("or,rikl->oikl", up.flatten(1), down) * self.scale


class LoRANetwork:
    """The set of adapters of one training run, by kohya name."""

    def __init__(self, targets: Mapping[str, nn.Module], rank: int, alpha: Optional[float] = None,
                 ranks: Optional[Mapping[str, int]] = None, alphas: Optional[Mapping[str, float]] = None):
        if not targets:
            raise LoRAError("the model offers no module to attach a LoRA to")
        self.targets = dict(targets)
        self.adapters: Dict[str, LoRAModule] = {}
        for name, module in self.targets.items():
            r = (ranks or {}).get(name, rank)
            a = (alphas or {}).get(name, alpha if alpha is not None else r)
            self.adapters[name] = LoRAModule(module, r, a)

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
        out: Dict[str, torch.Tensor] = {}
        for name, adapter in self.adapters.items():
            out[f"{name}.lora_down.weight"] = adapter.lora_down.weight.detach().to("cpu", dtype)
            out[f"{name}.lora_up.weight"] = adapter.lora_up.weight.detach().to("cpu", dtype)
            out[f"{name}.alpha"] = torch.tensor(adapter.alpha, dtype=dtype)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, adapter in self.adapters.items():
            adapter.lora_down.weight.copy_(state[f"{name}.lora_down.weight"])
            adapter.lora_up.weight.copy_(state[f"{name}.lora_up.weight"])

    def save(self, path: str | Path, metadata: Optional[Mapping[str, str]] = None,
             dtype: torch.dtype = torch.float16) -> Path:
        meta = {"ss_network_module": "networks.lora", "format": "pt"}
        ranks = {a.rank for a in self.adapters.values()}
        alphas = {a.alpha for a in self.adapters.values()}
        if len(ranks) == 1:
            meta["ss_network_dim"] = str(ranks.pop())
        if len(alphas) == 1:
            meta["ss_network_alpha"] = f"{alphas.pop():g}"
        meta.update(metadata or {})
        fileio.save_tensors(path, self.state_dict(dtype), meta)
        return Path(path)


def check_replaceable(dest: str | Path) -> None:
    """A host publishes a LoRA under the user's save name: it may replace an earlier DreamBooth
    LoRA of that name (the file's metadata says so), never a file from elsewhere."""
    from safetensors import safe_open

    dest = Path(dest)
    if not dest.exists():
        return
    try:
        with safe_open(str(dest), framework="pt") as f:
            ours = "dreambooth_version" in (f.metadata() or {})
    except Exception:  # not a safetensors file at all: certainly not ours
        ours = False
    if not ours:
        raise LoRAError(f"save_name: {dest} exists and was not made by DreamBooth; choose another save_name so "
                        "it is not overwritten")


def read_lora_file(path: str | Path) -> tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoRAError(f"{path}: only .safetensors LoRA files are loaded (pickle files can run code)")
    if not path.is_file():
        raise LoRAError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as exc:  # safetensors raises several types for a broken file
        raise LoRAError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_lora(targets: Mapping[str, nn.Module], source: str | Path | Mapping[str, torch.Tensor],
              multiplier: float = 1.0) -> LoRANetwork:
    """Attach the adapters stored in a kohya-style file (or state dict) to matching targets."""
    state = read_lora_file(source)[0] if isinstance(source, (str, Path)) else dict(source)
    names = sorted({k.rsplit(".lora_down.weight", 1)[0] for k in state if k.endswith(".lora_down.weight")})
    if not names:
        raise LoRAError(f"{source}: no '<name>.lora_down.weight' keys; is this a kohya-style LoRA file?")
    unknown = [n for n in names if n not in targets]
    if unknown:
        raise LoRAError(f"{len(unknown)} LoRA modules do not exist in this model (e.g. {unknown[:3]}); "
                        "was the LoRA trained on another base model?")
    ranks = {n: state[f"{n}.lora_down.weight"].shape[0] for n in names}
    alphas = {n: float(state[f"{n}.alpha"]) if f"{n}.alpha" in state else float(ranks[n]) for n in names}
    network = LoRANetwork({n: targets[n] for n in names}, rank=1, ranks=ranks, alphas=alphas)
    network.load_state_dict(state)
    network.set_multiplier(multiplier)
    return network.attach()
