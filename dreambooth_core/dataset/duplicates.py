"""The same photo twice: an exact pixel digest (dropped) and a near-duplicate test, dHash plus mean
colour (kept, with a warning: near-identical photos favour overfitting)."""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Tuple

import numpy as np
from PIL import Image

#: dHash Hamming distance (of 64 bits) at or below which two images count as near duplicates.
NEAR_DUPLICATE_BITS = 6
#: ...and the largest per-channel mean-colour difference (0-255): dHash only sees luminance
#: gradients, so flat images of different colours would otherwise all look alike.
NEAR_DUPLICATE_COLOUR = 24


def _pixel_digest(img: Image.Image) -> str:
    """Hash of the decoded pixels, in strips so a big photo is not copied whole."""
    h = hashlib.sha256(f"{img.width}x{img.height}".encode())
    for y in range(0, img.height, 256):
        h.update(img.crop((0, y, img.width, min(img.height, y + 256))).tobytes())
    return h.hexdigest()


def _dhash(img: Image.Image) -> int:
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _mean_colour(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((8, 8), Image.Resampling.BOX), dtype=np.float64).reshape(-1, 3).mean(0)


def _near_duplicate(dhash: int, colour: np.ndarray,
                    kept: Iterable[Tuple[str, int, np.ndarray]]) -> Optional[Tuple[str, int]]:
    """The first kept image (source, dHash distance) that this one nearly duplicates, or None."""
    for other, ohash, ocolour in kept:
        dist = bin(dhash ^ ohash).count("1")
        if dist <= NEAR_DUPLICATE_BITS and np.abs(colour - ocolour).max() <= NEAR_DUPLICATE_COLOUR:
            return other, dist
    return None
