"""kohya LoRA names (diffusers layout) for the modules of the WebUI's ldm-layout model.

The WebUI's own model is the original CompVis/Stability UNet (`input_blocks.{i}.{0|1}`,
`middle_block.{0,1,2}`, `output_blocks.{i}.{0|1|2}`) and, for SD1, the transformers CLIP text
model. A LoRA that ComfyUI's LoraLoader, the WebUI's Lora support and diffusers all read names
modules in diffusers' layout (`lora_unet_down_blocks_0_attentions_1_…`,
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`), so these names are computed from the
ldm module paths here; the LoRA file is then the same as one trained in ComfyUI or standalone.

ldm → diffusers, for a UNet with N res blocks per level (N + 1 input blocks per level):
  input_blocks.{1 + b(N+1) + j}.0 / .1 → down_blocks.{b}.resnets.{j} / attentions.{j};
  input_blocks.{(b+1)(N+1)}.0.op → down_blocks.{b}.downsamplers.0.conv;
  middle_block.0 / 1 / 2 → mid_block.resnets.0 / attentions.0 / resnets.1;
  output_blocks.{b(N+1) + j}.0 / .1 → up_blocks.{b}.resnets.{j} / attentions.{j};
  the last module of output_blocks.{b(N+1) + N} with a `conv` → up_blocks.{b}.upsamplers.0.conv.
Inside a transformer the names are the same in both layouts (`transformer_blocks.0.attn1.to_q`).
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import nn

# ldm resnet part → diffusers resnet part
_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
           "emb_layers.1": "time_emb_proj"}
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "mlp.fc1", "mlp.fc2")


def _resnet(rest: str) -> Optional[str]:
    for ldm, diffusers in _RESNET.items():
        if rest == ldm:
            return diffusers
    return None


def _is_attention(block: nn.Module) -> bool:
    return type(block).__name__ == "SpatialTransformer"


def unet_diffusers_path(path: str, per_level: int, output_block: Optional[nn.Sequential] = None) -> Optional[str]:
    """The diffusers path of the ldm UNet module `path` (relative to `diffusion_model`), or None
    where diffusers has no such module. `per_level` is N + 1."""
    parts = path.split(".")
    head = parts[0]
    if head == "middle_block" and len(parts) > 2:
        idx, rest = int(parts[1]), ".".join(parts[2:])
        if idx == 1:
            return f"mid_block.attentions.0.{rest}"
        res = _resnet(rest)
        return f"mid_block.resnets.{idx // 2}.{res}" if res else None
    if head not in ("input_blocks", "output_blocks") or len(parts) < 4:
        return None
    i, sub, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
    if head == "input_blocks":
        if i == 0:
            return None
        b, j = divmod(i - 1, per_level)
        if j == per_level - 1:  # the downsampler of level b
            return f"down_blocks.{b}.downsamplers.0.conv" if rest == "op" else None
        if sub == 1:
            return f"down_blocks.{b}.attentions.{j}.{rest}"
        res = _resnet(rest)
        return f"down_blocks.{b}.resnets.{j}.{res}" if res else None
    b, j = divmod(i, per_level)
    if sub == 0:
        res = _resnet(rest)
        return f"up_blocks.{b}.resnets.{j}.{res}" if res else None
    if output_block is not None and _is_attention(output_block[sub]):
        return f"up_blocks.{b}.attentions.{j}.{rest}"
    return f"up_blocks.{b}.upsamplers.0.conv" if rest == "conv" else None


def unet_lora_targets(diffusion_model: nn.Module, conv: bool = False) -> Dict[str, nn.Module]:
    """kohya name → module for the UNet's attention Linears/1×1 convs (and, with `conv`, the
    resnet, downsampler and upsampler convolutions: LoCon)."""
    n = diffusion_model.num_res_blocks
    per_level = (n[0] if isinstance(n, (list, tuple)) else int(n)) + 1
    out: Dict[str, nn.Module] = {}
    for path, module in diffusion_model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        parts = path.split(".")
        block = None
        if parts[0] == "output_blocks" and len(parts) > 2:
            block = diffusion_model.output_blocks[int(parts[1])]
        dpath = unet_diffusers_path(path, per_level, block)
        if dpath is None:
            continue
        if ".attentions." in dpath or (conv and any(p in dpath for p in (".resnets.", "samplers."))):
            out["lora_unet_" + dpath.replace(".", "_")] = module
    return out


def clip_lora_targets(text_model_encoder_layers: nn.ModuleList, prefix: str = "lora_te") -> Dict[str, nn.Module]:
    """kohya name → Linear for a transformers CLIP text encoder's layers."""
    out: Dict[str, nn.Module] = {}
    for i, layer in enumerate(text_model_encoder_layers):
        for rest in TEXT_TARGETS:
            module = layer.get_submodule(rest)
            out[f"{prefix}_text_model_encoder_layers_{i}_{rest.replace('.', '_')}"] = module
    return out
