"""Subject masks for a masked loss: only the subject's pixels are learned.

With a plain loss the identifier also absorbs whatever the few photos share besides the subject
(their backgrounds, the empty corners where an accessory could have stood); kohya-ss's
`--masked_loss` and OneTrainer's masked training weight the loss by a mask of the subject instead.
Masks come from a cut-out's alpha channel or from a host's mask (ComfyUI's MASK), are cropped
exactly like their images, and are kept as 8-bit "L" images (255: the subject).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from PIL import Image, ImageOps

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def alpha_mask(im: Image.Image) -> Optional[Image.Image]:
    """The image's alpha channel as a mask, or None where it has none (or it is fully opaque)."""
    if im.mode not in _ALPHA_MODES and "transparency" not in im.info and not (
            im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"):
        return None
    alpha = im.convert("RGBA").getchannel("A")
    return None if alpha.getextrema()[0] == 255 else alpha


def array_alpha_mask(obj: Any) -> Optional[Image.Image]:
    """Alpha of an in-memory image: a PIL image, or the fourth channel of an H×W×4 array/tensor."""
    if isinstance(obj, Image.Image):
        return alpha_mask(ImageOps.exif_transpose(obj))  # upright, as the image itself is loaded
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().float().numpy()
    arr = np.asarray(obj)
    if arr.ndim != 3 or arr.shape[-1] != 4:
        return None
    return to_mask(arr[..., 3], "alpha channel")


def to_mask(obj: Any, what: str) -> Image.Image:
    """A mask as an "L" image: PIL images, H×W (or H×W×1, 1×H×W) arrays or tensors of bool,
    uint8 (0-255) or float (0-1) values."""
    if isinstance(obj, Image.Image):
        return obj.convert("L")
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().float().numpy()
    arr = np.asarray(obj)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:2])
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"{what}: expected an H×W mask, got shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError(f"{what}: contains NaN or infinite values")
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype.kind in "iu" and arr.min() >= 0 and arr.max() <= 255:
        arr = arr.astype(np.uint8)
    else:
        raise ValueError(f"{what}: dtype {arr.dtype} with values outside 0-255; use bool, uint8 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(arr), "L")


def coverage(mask: Image.Image) -> float:
    """Share of the image that the mask marks as subject (0-1)."""
    return float(np.asarray(mask, np.float32).mean() / 255.0)
