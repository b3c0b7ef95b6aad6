"""What a run computes once before its first step: VAE latents of every training image (and of its
mirror image when flipping is allowed), grouped by size into buckets, the subject masks at latent
size, and, while the text encoders are frozen, the embedding of every caption. In a run of several
subjects (dataset/concepts.py) a bucket also holds each image's repeats, loss weight and class prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..backends.base import Backend, Cond

ENCODE_BATCH = 8  # images per VAE call while caching


@dataclass
class Bucket:
    latents: torch.Tensor  # (N, C, h, w)
    flipped: Optional[torch.Tensor]
    captions: List[str]
    size: tuple  # (H, W) in pixels
    masks: Optional[torch.Tensor] = None  # (N, 1, h, w) in [0, 1] at latent size: subject masks
    # Several subjects; each None where it would not change the run (see concept_fields):
    repeats: Optional[torch.Tensor] = None  # (N,) on the CPU: how often each image is drawn, relative
    loss_weights: Optional[torch.Tensor] = None  # (N,) on the CPU: each image's instance-loss factor
    class_prompts: Optional[List[str]] = None  # the class prompt whose class images pair with each image


def pil_to_tensor(image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def has_masks(items: Sequence) -> bool:
    """Whether any example carries a subject mask (dataset.TrainImage.mask): a masked loss."""
    return any(getattr(ex, "mask", None) is not None for ex in items)


@torch.no_grad()
def cache_images(backend: Backend, examples: Sequence, flip: bool) -> List[Bucket]:
    """Latents of the examples (each `.image`, `.caption`, optional `.mask`), one bucket per image size."""
    groups: Dict[tuple, list] = {}
    for ex in examples:
        groups.setdefault((ex.image.height, ex.image.width), []).append(ex)
    fields = concept_fields(examples)
    buckets = []
    for size, items in sorted(groups.items()):
        given = [getattr(ex, "latent", None) for ex in items]
        if all(t is not None for t in given):  # a model's own samples (class_images.cache: sample latents)
            latents, flipped = torch.stack([t.float() for t in given]), None
        elif any(t is not None for t in given):
            raise ValueError("some images of one size come with their latents and some without; a set of class "
                             "samples is either all latents or all images")
        else:
            pixels = torch.stack([pil_to_tensor(ex.image) for ex in items])
            latents = _encode(backend, pixels)
            flipped = _encode(backend, pixels.flip(-1)) if flip else None
        masks = latent_masks(items, latents.shape[-2:])
        bucket = Bucket(latents, flipped, [ex.caption for ex in items], size,
                        None if masks is None else masks.to(latents.device))
        if "repeats" in fields:
            bucket.repeats = torch.tensor([float(ex.repeats) for ex in items])
        if "loss_weight" in fields:
            bucket.loss_weights = torch.tensor([float(ex.loss_weight) for ex in items])
        if "class_prompt" in fields:
            bucket.class_prompts = [ex.class_prompt for ex in items]
        buckets.append(bucket)
    return buckets


def concept_fields(examples: Sequence) -> set:
    """Which per-subject fields (dataset.TrainImage: repeats, loss_weight, class_prompt) change the run:
    repeats and class prompts that differ between images, a loss weight other than 1. A run of one
    subject has none, and draws exactly as before subjects could be several."""
    out = set()
    if len({getattr(ex, "repeats", 1) for ex in examples}) > 1:
        out.add("repeats")
    if any(getattr(ex, "loss_weight", 1.0) != 1.0 for ex in examples):
        out.add("loss_weight")
    if len({getattr(ex, "class_prompt", "") for ex in examples}) > 1:
        out.add("class_prompt")
    return out


def _encode(backend: Backend, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([backend.encode_images(pixels[i:i + ENCODE_BATCH]) for i in range(0, len(pixels), ENCODE_BATCH)])


def latent_masks(items: Sequence, latent_size) -> Optional[torch.Tensor]:
    """Subject masks averaged down to latent pixels; None if no item has one, and all ones for an
    item without."""
    if not has_masks(items):
        return None
    full = [torch.ones(ex.image.height, ex.image.width) if getattr(ex, "mask", None) is None
            else torch.from_numpy(np.asarray(ex.mask.convert("L"), np.float32) / 255.0) for ex in items]
    return torch.nn.functional.interpolate(torch.stack(full)[:, None], size=tuple(latent_size), mode="area")


@torch.no_grad()
def cache_text(backend: Backend, buckets: Sequence[Bucket], caption_dropout: bool) -> Dict[tuple, Cond]:
    """The embedding of every (caption, image size), and of the empty caption when captions are dropped."""
    cache: Dict[tuple, Cond] = {}
    dropped = [""] if caption_dropout else []
    for b in buckets:
        for caption in list(b.captions) + dropped:
            if (caption, b.size) not in cache:
                cache[(caption, b.size)] = backend.encode_text([caption], size=b.size)
    return cache
