"""Training sizes and crops: the square, or the aspect-ratio bucket nearest each photo, filled by
resizing to cover and cropping (centred, or at offsets seeded by the image's name)."""
from __future__ import annotations

import math
import random
from typing import List, Sequence, Tuple

from PIL import Image

CROPS = ("center", "random", "bucket")


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise ValueError(f"resolution: {resolution!r} is not a positive multiple of 8 (e.g. 512)")


def bucket_sizes(resolution: int, max_aspect: float = 2.0) -> List[Tuple[int, int]]:
    """Aspect-ratio buckets (w, h) with w*h <= resolution², aspect within 1:max_aspect..max_aspect:1.

    Sides are multiples of 64 (SD's UNet halves the latent three times), or of 8 below 256 px,
    where a 64 px step would leave only the square."""
    _check_resolution(resolution)
    step = 64 if resolution >= 256 else 8
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        h = area // w // step * step
        if h >= step and 1 / max_aspect <= w / h <= max_aspect:
            sizes.update({(w, h), (h, w)})  # both orientations: portrait and landscape alike
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def _nearest_bucket(w: int, h: int, buckets: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    ratio = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def _target_size(w: int, h: int, resolution: int, crop: str) -> Tuple[int, int]:
    if crop == "bucket":
        return _nearest_bucket(w, h, bucket_sizes(resolution))
    return resolution, resolution


def _cover_and_crop(img: Image.Image, target: Tuple[int, int], crop: str, rng_key: str) -> Tuple[Image.Image, float]:
    """Resize to cover `target`, then crop to it (centre, or seeded random offsets)."""
    tw, th = target
    scale = max(tw / img.width, th / img.height)
    nw, nh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if crop == "random":
        rng = random.Random(rng_key)
        left, top = rng.randint(0, nw - tw), rng.randint(0, nh - th)
    else:
        left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th)), scale
