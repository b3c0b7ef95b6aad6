"""Weight wrappers that put trainable deltas into a cloned ComfyUI ModelPatcher.

ComfyUI's ops call every function in a module's `weight_function` / `bias_function` list on a
*copy* of the weight at each forward pass (`comfy.ops.cast_bias_weight`); `ModelPatcher.load()`
fills those lists from the patcher's `weight_wrapper_patches`. So a wrapper registered with
`patcher.add_weight_wrapper(key, fn)` on a clone affects only that clone: the MODEL other nodes
share keeps its weights and its own (empty) wrapper lists. The memory manager asks wrappers how
much memory they hold (`passive_memory_usage`) and moves them with the model (`move_to`).

Also here: the kohya-style LoRA names of ComfyUI's modules, in diffusers layout
(`lora_unet_down_blocks_0_attentions_0_…`, `lora_te_text_model_encoder_layers_0_self_attn_q_proj`,
`lora_te1_`/`lora_te2_` for SDXL), computed with the host's own ldm→diffusers map and the core's
kohya rules (dreambooth_core.adapters.kohya), so a LoRA from these nodes is interchangeable with one from
the standalone diffusers backend and the WebUI.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..dreambooth_core.adapters.frozen import FrozenForward, FrozenState, plain_weight
from ..dreambooth_core.adapters.frozen import frozen_patchable as core_frozen_patchable
from ..dreambooth_core.adapters.kohya import TEXT_TARGETS, is_unet_target, kohya_name, text_layer_name


def _nbytes(params) -> int:
    return sum(p.nelement() * p.element_size() for p in params)


class LoRAWeight:
    """W ↦ W + ΔW, ΔW = (alpha/rank)·up·down from a dreambooth_core LoRAModule."""

    def __init__(self, adapter: nn.Module):
        self.adapter = adapter

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.adapter.weight_delta()
        return weight + delta.to(device=weight.device, dtype=weight.dtype)

    def passive_memory_usage(self) -> int:
        return _nbytes(self.adapter.parameters())

    def move_to(self, device) -> int:
        self.adapter.to(device=device)
        return self.passive_memory_usage()


class DiffWeight:
    """W ↦ W + D with a full-size trainable D (full fine-tuning without touching W)."""

    def __init__(self, diff: nn.Parameter):
        self.diff = diff

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.diff.to(device=weight.device, dtype=weight.dtype)

    def passive_memory_usage(self) -> int:
        return self.diff.nelement() * self.diff.element_size()

    def move_to(self, device) -> int:
        with torch.no_grad():
            self.diff.data = self.diff.data.to(device)
        return self.passive_memory_usage()


class FreshCopy:
    """Identity. Registering it makes ComfyUI cast a *copy* of the weight for each forward.

    Nodes run under torch.inference_mode(), so a checkpoint loaded by the host holds inference
    tensors; autograd cannot save those for backward (a frozen Linear saves its weight to
    back-propagate into its input). A module with a weight function always works on a copy, which
    is an ordinary tensor when made outside inference mode."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


FRESH_COPY = FreshCopy()


# -- frozen Linears and convolutions without a weight copy (dreambooth_core.adapters.frozen) ---------

def comfy_weight(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The module's weight as its forward sees it, through the host's `cast_bias_weight` (so lowvram
    patches and manual-cast dtypes apply in backward as in forward)."""
    if hasattr(module, "weight_function"):
        import comfy.ops

        return comfy.ops.cast_bias_weight(module, like)[0]
    return plain_weight(module, like)


_TORCH_OPS = {  # ComfyUI's plain op class -> torch's own op on (module, input, weight, bias)
    "Linear": lambda m, x, w, b: F.linear(x, w, b),
    "Conv2d": lambda m, x, w, b: m._conv_forward(x, w, b),
    "GroupNorm": lambda m, x, w, b: F.group_norm(x, m.num_groups, w, b, m.eps),
    "LayerNorm": lambda m, x, w, b: F.layer_norm(x, m.normalized_shape, w, b, m.eps),
}
_TORCH_BASES = (("Conv2d", nn.Conv2d), ("GroupNorm", nn.GroupNorm), ("LayerNorm", nn.LayerNorm), ("Linear", nn.Linear))


class DirectOp:
    """A plain ComfyUI op's own forward (Linear, Conv2d, GroupNorm, LayerNorm), as torch's op on the
    module's own weight and bias wherever ComfyUI's cast hands those back unchanged (the input's dtype
    and device, no weight functions, no dynamic offload): the cast then does nothing but costs ~70 µs
    of Python per call, about 20 ms of a mini SD1.5 step on the CPU, forward and backward. The identity
    is seen once per input dtype and device by calling the host's cast itself; a weight function added
    later, another dtype or device, or any extra argument go through the host's forward as before. The
    host's per-op hook (0.33's interrupt check) still runs."""

    def __init__(self, module: nn.Module, kind: str):
        import comfy.ops

        self.module, self.host = module, module.forward
        self._cast = comfy.ops.cast_bias_weight
        self._every_op = getattr(comfy.ops, "run_every_op", None)
        self._op = _TORCH_OPS[kind]
        self._seen: Dict[tuple, bool] = {}  # (dtype, device) -> the cast returns the module's own tensors

    def _own_tensors(self, like: torch.Tensor) -> bool:
        m = self.module
        if m.weight_function or m.bias_function:
            return False
        key = (like.dtype, like.device)
        ok = self._seen.get(key)
        if ok is None:
            with torch.no_grad():
                weight, bias = self._cast(m, like)[:2]
            ok = self._seen[key] = weight is m.weight and bias is m.bias
        return ok

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not self._own_tensors(x):
            return self.host(x, *args, **kwargs)
        if self._every_op is not None:
            self._every_op()
        m = self.module
        return self._op(m, x, m.weight, m.bias)

    def read_weight(self, module: nn.Module, like: torch.Tensor) -> torch.Tensor:
        """comfy_weight without the cast where the forward ran without it."""
        return module.weight if self._own_tensors(like) else comfy_weight(module, like)


def direct_op(module: nn.Module) -> "DirectOp | None":
    """The module as DirectOp where it is one of ComfyUI's plain ops (optionally manual-cast) with a
    weight, running its class's own forward (no other node patched it); None otherwise."""
    if not hasattr(module, "weight_function") or "forward" in vars(module) or getattr(module, "weight", None) is None:
        return None
    import comfy.ops

    kind = next((k for k, base in _TORCH_BASES if isinstance(module, base)), None)
    if kind is None:
        return None
    plain = {getattr(getattr(comfy.ops, ns), kind).forward
             for ns in ("disable_weight_init", "manual_cast") if hasattr(getattr(comfy.ops, ns, None), kind)}
    return DirectOp(module, kind) if type(module).forward in plain else None


def frozen_forward(module: nn.Module, state: FrozenState, adapter: "nn.Module | None" = None) -> FrozenForward:
    """The core's FrozenForward reading the weight the way ComfyUI's ops cast it; a plain op whose
    forward is its class's own (no other node patched it) runs as DirectOp."""
    direct = direct_op(module)
    if direct is not None:
        return FrozenForward(module, adapter, direct.read_weight, state=state, host_forward=direct)
    return FrozenForward(module, adapter, comfy_weight, state=state)


def frozen_patchable(module: nn.Module) -> bool:
    """The core's frozen_patchable, and the module's forward is the host's plain (optionally
    manual-cast) one: quantized / scaled-fp8 op variants keep the host's own path (with a fresh copy)."""
    if not core_frozen_patchable(module):
        return False
    try:
        import comfy.ops
    except ImportError:
        return True
    kind = "Conv2d" if isinstance(module, nn.Conv2d) else "Linear"
    plain = {getattr(getattr(comfy.ops, ns), kind).forward_comfy_cast_weights
             for ns in ("disable_weight_init", "manual_cast") if hasattr(comfy.ops, ns)}
    own = getattr(type(module), "forward_comfy_cast_weights", None)
    return own is None or own in plain


def comfy_op_modules(root: nn.Module):
    """(name, module) of the modules whose weights ComfyUI casts through weight functions."""
    for name, module in root.named_modules():
        if hasattr(module, "weight_function") and getattr(module, "weight", None) is not None:
            yield name, module


# -- kohya names ----------------------------------------------------------------------------------

TEXT_ENCODER_NAMES = ("clip_l", "clip_h", "clip_g")


def unet_targets(base_model, conv: bool = False) -> Dict[str, Tuple[str, nn.Module]]:
    """kohya name -> (weight key in the ModelPatcher, module) for the UNet's attention blocks
    (and its res-block/up/down-sampler convolutions when `conv`), named in diffusers layout."""
    import comfy.utils

    ldm_to_diffusers = {}
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(base_model.model_config.unet_config).items():
        if diffusers_key.endswith(".weight"):
            ldm_to_diffusers.setdefault(ldm_key[: -len(".weight")], diffusers_key[: -len(".weight")])
    out: Dict[str, Tuple[str, nn.Module]] = {}
    for path, module in base_model.diffusion_model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        dpath = ldm_to_diffusers.get(path)
        if dpath is None:  # no diffusers name (and so no kohya name stock loaders map): skip
            continue
        if is_unet_target(dpath, conv):
            out[kohya_name("lora_unet", dpath)] = (f"diffusion_model.{path}.weight", module)
    return out


def text_targets(cond_stage_model) -> Dict[str, Tuple[str, nn.Module]]:
    """kohya name -> (weight key in the CLIP's patcher, module) for the attention and MLP Linears
    of each CLIP text encoder: `lora_te_…` for one encoder, `lora_te1_…`/`lora_te2_…` for SDXL."""
    present = [n for n in TEXT_ENCODER_NAMES if getattr(cond_stage_model, n, None) is not None]
    if "clip_l" in present and "clip_g" in present:
        prefixes = {"clip_l": "lora_te1", "clip_g": "lora_te2"}
    else:
        prefixes = {n: "lora_te" for n in present[:1]}
    out: Dict[str, Tuple[str, nn.Module]] = {}
    for enc_name, prefix in prefixes.items():
        layers_path = f"{enc_name}.transformer.text_model.encoder.layers"
        for path, module in cond_stage_model.named_modules():
            if not path.startswith(layers_path + ".") or not isinstance(module, nn.Linear):
                continue
            index, _, rest = path[len(layers_path) + 1:].partition(".")
            if rest in TEXT_TARGETS:
                out[text_layer_name(prefix, int(index), rest)] = (f"{path}.weight", module)
    return out
