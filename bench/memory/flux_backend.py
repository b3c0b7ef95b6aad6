"""A Backend over diffusers' FluxTransformer2DModel, enough for the trainer's step (predict, LoRA
targets, checkpointing, the flow schedule). Our users train Flux through the ComfyUI host, whose
model has the same blocks and widths; the estimator only needs the architecture's memory. LoRA goes
on the blocks' attention and MLP Linears, the set the ComfyUI flow path adapts (there q, k and v are
one fused Linear; diffusers keeps them apart, which changes the adapters' size by a few MB)."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from dreambooth_core.adapters.kohya import kohya_name
from dreambooth_core.backends.base import BackendDefaults, Cond
from dreambooth_core.training.schedules import FlowSchedule

# The modules of each block that carry LoRA: img/txt attention q,k,v + out, the two MLPs; in the
# single blocks q,k,v, the MLP input and the fused output (ComfyUI's linear1 / linear2).
_LORA_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2·W/2, 4C) tokens: Flux's 2×2 patches."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


class FluxBackend(BackendDefaults):
    family = "flux"
    prediction_type = "flow"
    latent_factor = 8

    def __init__(self, transformer: nn.Module, native_resolution: int = 1024, guidance: float = 3.5):
        self.transformer = transformer.requires_grad_(False).eval()
        self.native_resolution = native_resolution
        self.guidance = guidance

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def schedule(self) -> FlowSchedule:
        return FlowSchedule(shift=3.0)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, c, h, w = noisy.shape
        dtype = next(self.transformer.parameters()).dtype
        dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        img_ids = torch.zeros(h // 2, w // 2, 3, device=noisy.device)
        img_ids[..., 1] += torch.arange(h // 2, device=noisy.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=noisy.device)[None, :]
        txt_ids = torch.zeros(cond["context"].shape[1], 3, device=noisy.device)
        guidance = torch.full((b,), self.guidance, device=noisy.device)
        out = self.transformer(hidden_states=pack(noisy).to(dtype), encoder_hidden_states=cond["context"],
                               pooled_projections=cond["pooled"], timestep=timesteps, img_ids=img_ids.flatten(0, 1),
                               txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return unpack(out, c, h, w)

    def lora_targets(self, unet: bool, text_encoder: bool, conv: bool = False) -> Dict[str, nn.Module]:
        if text_encoder:
            raise ValueError("text_encoder: the flow path trains no text encoder (LoRA on the transformer only)")
        targets: Dict[str, nn.Module] = {}
        for name, module in self.transformer.named_modules():
            in_block = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            if in_block and isinstance(module, nn.Linear) and name.endswith(_LORA_LEAVES):
                targets[kohya_name("lora_unet", name)] = module
        return targets

    def trainable_models(self, unet: bool, text_encoder: bool) -> List[nn.Module]:
        return [self.transformer] if unet else []

    def set_gradient_checkpointing(self, enabled: "bool | str") -> None:
        """Every block or none: this backend cannot checkpoint selectively, so any scope is "full"."""
        if enabled and enabled != "off":
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()
