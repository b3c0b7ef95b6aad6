"""Colour modes to 8-bit RGB: CMYK, palettes, 16-bit and float grayscale, and transparency
composited on neutral grey, each fix noted in the file's report."""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from .report import _Log, _Skip

#: Neutral mid-grey that transparent areas are composited on: black or white backgrounds would
#: teach the model a dark or bright halo around cut-out subjects.
ALPHA_BACKGROUND = (128, 128, 128)


def _composite(rgba: Image.Image, log: _Log, what: str) -> Image.Image:
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return rgba.convert("RGB")  # an opaque alpha channel carries nothing
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    log.fixed(f"{what} composited on grey {ALPHA_BACKGROUND[0]}")
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray_to_uint8(arr: np.ndarray, full_scale: Optional[float], log: _Log, what: str) -> np.ndarray:
    """High-depth samples → uint8 by their real range. Pillow's convert("L") clips 16-bit values
    at 255, which turns a 16-bit photo white. `full_scale` None: guess it from the values."""
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise _Skip(f"{what} contains NaN or infinite values")
    if full_scale is None:
        top = float(arr.max(initial=0))
        full_scale = 1.0 if top <= 1.0 else 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    if full_scale != 255.0:
        log.fixed(f"{what} scaled to 8-bit")
    return np.clip(np.rint(arr * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image, log: _Log) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im.convert("RGB")  # a copy: never alias the caller's image or an open file
    if mode == "CMYK":
        log.fixed("CMYK converted to RGB")
        return im.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        full = 65535.0 if mode.startswith("I;16") else None
        arr = _gray_to_uint8(np.asarray(im), full, log, "16-bit grayscale" if full else f"{mode}-mode grayscale")
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        if "transparency" in im.info or im.palette and im.palette.mode == "RGBA":
            return _composite(im.convert("RGBA"), log, "palette image with transparency")
        return im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return _composite(im.convert("RGBA"), log, f"{mode} image with transparency")
    if mode in ("L", "1"):
        log.fixed("grayscale converted to RGB" if mode == "L" else "black-and-white converted to RGB")
        return im.convert("RGB")
    log.fixed(f"{mode} converted to RGB")
    return im.convert("RGB")
