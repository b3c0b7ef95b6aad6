"""kohya LoRA names (diffusers layout) for the modules of the WebUI's ldm-layout model.

The WebUI's own model (and Forge's `IntegratedUNet2DConditionModel`) is the original CompVis/Stability UNet (`input_blocks.{i}.{0|1}`,
`middle_block.{0,1,2}`, `output_blocks.{i}.{0|1|2}`) and, for SD1, the transformers CLIP text
model. The names come from dreambooth_core.adapters.kohya (the ldm → diffusers map is there), so the
LoRA file is the same as one trained in ComfyUI or standalone.
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from dreambooth_core.adapters.kohya import TEXT_TARGETS, is_unet_target, kohya_name, text_layer_name, unet_diffusers_path
from dreambooth_core.adapters.lora import is_linear_like


def unet_lora_targets(diffusion_model: nn.Module, conv: bool = False) -> Dict[str, nn.Module]:
    """kohya name → module for the UNet's attention Linears/1×1 convs (and, with `conv`, the
    resnet, downsampler and upsampler convolutions: LoCon)."""
    n = diffusion_model.num_res_blocks
    per_level = (n[0] if isinstance(n, (list, tuple)) else int(n)) + 1
    out: Dict[str, nn.Module] = {}
    for path, module in diffusion_model.named_modules():
        if not (isinstance(module, nn.Conv2d) or is_linear_like(module)):  # Forge's Linear is no nn.Linear
            continue
        parts = path.split(".")
        attention = (parts[0] == "output_blocks" and len(parts) > 2 and
                     type(diffusion_model.output_blocks[int(parts[1])][int(parts[2])]).__name__ == "SpatialTransformer")
        dpath = unet_diffusers_path(path, per_level, attention)
        if dpath is not None and is_unet_target(dpath, conv):
            out[kohya_name("lora_unet", dpath)] = module
    return out


def clip_lora_targets(text_model_encoder_layers: nn.ModuleList, prefix: str = "lora_te") -> Dict[str, nn.Module]:
    """kohya name → Linear for a transformers CLIP text encoder's layers."""
    out: Dict[str, nn.Module] = {}
    for i, layer in enumerate(text_model_encoder_layers):
        for rest in TEXT_TARGETS:
            module = layer.get_submodule(rest)
            out[text_layer_name(prefix, i, rest)] = module
    return out
