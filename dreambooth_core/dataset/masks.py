"""Subject masks for a masked loss: only the subject's pixels are learned.

With a plain loss the identifier also absorbs whatever the few photos share besides the subject
(their backgrounds, the empty corners where an accessory could have stood); kohya-ss's
`--masked_loss` and OneTrainer's masked training weight the loss by a mask of the subject instead.
Masks come from a cut-out's alpha channel or from a host's mask (ComfyUI's MASK), are cropped
exactly like their images, and are kept as 8-bit "L" images (255: the subject).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps

from .report import DatasetError, _Log, _Skip
from .sources import _Candidate

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


# ---------------------------------------------------------------------------------------------
# one mask per training image


def _given_masks(masks: Any, cands: Sequence[_Candidate]) -> Optional[list]:
    """The caller's own masks, one per in-memory image (None for "alpha" or no masks)."""
    if masks is None or (isinstance(masks, str) and masks == "alpha"):
        return None
    if isinstance(masks, (str, os.PathLike)):
        raise DatasetError(f"masks: {str(masks)!r} is not understood; give \"alpha\" (each image's alpha channel) "
                           "or one mask per image")
    if any(c.path is not None for c in cands):
        raise DatasetError("masks: a list of masks goes with in-memory images; for files use masks=\"alpha\" "
                           "(cut-outs with a transparent background)")
    shape = getattr(masks, "shape", None)
    given = masks
    if shape is not None and len(shape) in (2, 3):  # one H×W mask, or a B×H×W batch (ComfyUI's MASK)
        given = [masks] if len(shape) == 2 else list(masks)
    if not isinstance(given, (list, tuple)) or len(given) != len(cands):
        n = len(given) if isinstance(given, (list, tuple)) else "not a list of"
        raise DatasetError(f"masks: {n} mask(s) for {len(cands)} image(s); give one mask per image")
    return list(given)


def _subject_mask(masks: Any, given: Optional[list], index: int, alpha: Optional[Image.Image],
                  size: Tuple[int, int], log: _Log) -> Optional[Image.Image]:
    """This image's mask at its own size, or None (no masks asked for, or "alpha" without one)."""
    if masks is None:
        return None
    if given is None:
        if alpha is None:
            log.warn("no transparency to read a subject mask from: the whole image is learned")
            return None
        mask = alpha
    else:
        try:
            mask = to_mask(given[index], f"masks[{index}]")
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
    if mask.size != size:
        if abs(mask.width / mask.height - size[0] / size[1]) > 0.01:
            raise DatasetError(f"masks[{index}]: {mask.width}x{mask.height} does not have the shape of its image "
                               f"({size[0]}x{size[1]}); give each image a mask of its own aspect ratio")
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    if coverage(mask) < 1e-3:
        raise _Skip("its subject mask is empty (marks nothing to learn); fix the mask or leave the image out")
    return mask
