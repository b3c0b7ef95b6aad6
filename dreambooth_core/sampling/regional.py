"""Regional composition: each region of the canvas is denoised by the model with only its own adapters
and its own prompt, and the predictions are put together by the regions' masks.

This is what ComfyUI does with hook LoRAs on area conditioning (CreateHookLora + SetClipHooks +
ConditioningSetArea): per step, every area's prediction is made on that area's crop of the latent,
with the weights its hooks patch in, and each pixel takes the prediction of the area covering it.
Here it runs on the core's diffusers backend, so the toy world can measure what it buys over plain
LoRA stacking (dreambooth_core.evaluation.multi). Adapters are applied by patching weights, as the
host's hooks do, so several networks may act on one module (stacking) and any region may run with
none (the base model).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch
from torch import nn

from ..adapters.network import LoRANetwork
from ..backends.base import SampleSettings


class RegionError(ValueError):
    pass


@dataclass(frozen=True)
class Region:
    """A box of the canvas in pixels (top, left, height, width), its prompt and its adapters."""

    prompt: str
    box: tuple[int, int, int, int]
    networks: tuple[LoRANetwork, ...] = ()


def patched_weights(networks: Sequence[LoRANetwork]) -> Dict[nn.Module, torch.Tensor]:
    """Each adapted module's weight with every network's ΔW added (the networks stay detached)."""
    weights: Dict[nn.Module, torch.Tensor] = {}
    with torch.no_grad():
        for network in networks:
            for name, adapter in network.adapters.items():
                module = network.targets[name]
                base = weights.get(module, module.weight.data)
                weights[module] = base + adapter.weight_delta().to(base.device, base.dtype)
    return weights


@contextmanager
def weights_in_place(weights: Dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Swap the given weights in (no copy) and the originals back afterwards, whatever happens."""
    saved = {module: module.weight.data for module in weights}
    try:
        for module, weight in weights.items():
            module.weight.data = weight
        yield
    finally:
        for module, weight in saved.items():
            module.weight.data = weight


def region_masks(regions: Sequence[Region], height: int, width: int) -> List[np.ndarray]:
    """The regions' boxes as boolean masks; refuses boxes that leave the canvas, overlap or leave gaps,
    since a pixel must take exactly one region's prediction."""
    masks, cover = [], np.zeros((height, width), np.int32)
    for region in regions:
        top, left, h, w = region.box
        if top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > height or left + w > width:
            raise RegionError(f"region {region.prompt!r}: box {region.box} is not inside the {height}x{width} canvas")
        mask = np.zeros((height, width), bool)
        mask[top:top + h, left:left + w] = True
        masks.append(mask)
        cover += mask
    if not (cover == 1).all():
        raise RegionError(f"the regions must cover the {height}x{width} canvas exactly once "
                          f"({int((cover == 0).sum())} pixels uncovered, {int((cover > 1).sum())} covered twice)")
    return masks


@torch.no_grad()
def sample_regions(backend, regions: Sequence[Region], noise: torch.Tensor, settings: SampleSettings) -> np.ndarray:
    """One image (uint8 H×W×3) from `noise` (C, H/f, W/f): every step, each region's crop is predicted
    with its prompt and adapters (classifier-free guidance with the negative prompt under the same
    adapters) and written back where its box is. Every box must be a multiple of the latent factor."""
    f = backend.latent_factor
    height, width = noise.shape[-2] * f, noise.shape[-1] * f
    region_masks(regions, height, width)
    boxes = []
    for region in regions:
        if any(v % f for v in region.box):
            raise RegionError(f"region {region.prompt!r}: box {region.box} is not a multiple of {f} pixels")
        top, left, h, w = (v // f for v in region.box)
        boxes.append((slice(top, top + h), slice(left, left + w)))
    guided = settings.guidance > 1
    plans = []  # per region: its weights and its (negative +) prompt conditioning
    for region in regions:
        weights = patched_weights(region.networks)
        with weights_in_place(weights):
            prompts = [settings.negative_prompt, region.prompt] if guided else [region.prompt]
            cond = backend.encode_text(prompts, size=(region.box[2], region.box[3]))
        plans.append((weights, cond))
    scheduler = backend.pipeline(settings.sampler).scheduler
    scheduler.set_timesteps(settings.steps, device=backend.device)
    latents = noise[None].to(backend.device, backend.unet.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        pred = torch.empty_like(latents)
        for (rows, cols), (weights, cond) in zip(boxes, plans):
            crop = scheduler.scale_model_input(latents[:, :, rows, cols].contiguous(), t)
            batch = torch.cat([crop, crop]) if guided else crop
            with weights_in_place(weights):
                out = backend.predict(batch, t.expand(batch.shape[0]), cond)
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + settings.guidance * (text - uncond)
            pred[:, :, rows, cols] = out
        latents = scheduler.step(pred, t, latents).prev_sample
    image = (backend.decode_latents(latents)[0] + 1) / 2
    return (image.permute(1, 2, 0).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)


def noise_for(seeds: Sequence[int], channels: int, size: int) -> torch.Tensor:
    """Side-by-side noise (C, size, size·n): each square is what backend.generate draws for its seed, so a
    region sampled alone and the same region within a composition start from the same noise."""
    parts = [torch.randn((channels, size, size), generator=torch.Generator("cpu").manual_seed(int(s)))
             for s in seeds]
    return torch.cat(parts, dim=-1)
