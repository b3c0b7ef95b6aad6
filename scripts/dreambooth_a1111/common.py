"""What the two WebUI backends (A1111's ldm/sgm model, Forge's engine) do alike, written once.

Both hosts encode prompts through the model's own `get_learned_conditioning`, which takes the WebUI's
`SdConditioning` (a list of prompts that carries the image size: SDXL's size embeddings read it) and
returns either one cross-attention tensor (SD1/SD2) or SDXL's dict of `crossattn` and `vector` (CLIP-G's
pooled output and the size/crop embeddings). Both hosts' UNets are the ldm layout, whose blocks the
backends checkpoint the same way.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

#: one prompt chunk: the core batches captions of 77 tokens (as the other backends)
CHUNK = 77


def prompt_batch(prompts: Sequence[str], size: Tuple[int, int]):
    """The prompts as the WebUI's conditioning code takes them, with the training image's size (height, width)."""
    from modules.prompt_parser import SdConditioning

    height, width = size
    return SdConditioning(list(prompts), width=width, height=height)


def owned(t: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor from the host's result: Forge's and reForge's encoders run under inference mode, and
    an inference tensor cannot enter autograd."""
    return t.clone() if t.is_inference() else t


def conditioning_parts(cond) -> Dict[str, torch.Tensor]:
    """The core's conditioning from the host's: `context` (one 77-token chunk per prompt, so cached captions
    batch together) and, for SDXL, `vector` (the UNet's ADM input), as tensors the trainer may keep."""
    if isinstance(cond, dict):
        return {"context": owned(cond["crossattn"][:, :CHUNK]).float(), "vector": owned(cond["vector"]).float()}
    return {"context": owned(cond[:, :CHUNK]).float()}


def unet_inputs(cond: Dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The UNet's keyword inputs from the core's conditioning: `context` and, for SDXL, the ADM input `y`."""
    out = {"context": cond["context"].to(device, dtype)}
    if "vector" in cond:
        out["y"] = cond["vector"].to(device, dtype)
    return out


def unet_blocks(diffusion_model: nn.Module) -> List[nn.Module]:
    """The ldm UNet's blocks, the units gradient checkpointing recomputes."""
    dm = diffusion_model
    return list(dm.input_blocks) + [dm.middle_block] + list(dm.output_blocks)


def checkpointed(forward, *args, **kwargs):
    """Gradient checkpointing of one UNet block (its tensor arguments copied inside the recomputed region:
    Forge's blocks add to their inputs in place)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)

    def run(*a, **k):
        return forward(*(x.clone() if torch.is_tensor(x) else x for x in a), **k)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
