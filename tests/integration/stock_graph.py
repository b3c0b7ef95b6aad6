"""What a stock ComfyUI graph makes: the reference a class image must equal."""
from __future__ import annotations

import numpy as np
import torch


def stock_image(model, clip, vae, prompt: str, negative: str, latent: dict, seed: int, steps: int, cfg: float,
                sampler: str, scheduler: str) -> np.ndarray:
    """CLIPTextEncode (positive, negative) -> KSampler on `latent` -> VAEDecode, 8-bit as SaveImage writes it."""
    import nodes as host_nodes

    with torch.inference_mode():
        pos = host_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        neg = host_nodes.CLIPTextEncode().encode(clip, negative)[0]
        samples = host_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent)[0]
        image = host_nodes.VAEDecode().decode(vae, samples)[0]
    return np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8)
