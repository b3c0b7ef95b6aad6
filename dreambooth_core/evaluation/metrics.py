"""DreamBench's metrics, measured on the toy world instead of with CLIP/DINO.

The paper scores subject fidelity with DINO/CLIP-I (embedding similarity to real photos of the
subject), prompt fidelity with CLIP-T (image-text similarity), PRES (subject fidelity of plain
class samples: how much the class collapsed onto the subject) and DIV (LPIPS between samples of
one prompt). No such weights exist here, but the toy world's ground truth does: every sample can
be segmented and its colours, pattern and shape read off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..embedded import toyworld as tw

_TONES = [(name, np.array(tw.rgb_of(name), np.float32)) for name in tw.PALETTE]
_TONES += [(name, np.array(tw.shade_of(name), np.float32)) for name in tw.PALETTE]


def _colour_histogram(pixels: np.ndarray) -> np.ndarray:
    """Share of pixels nearest to each palette tone (colour and its pattern shade kept apart)."""
    tones = np.stack([t for _, t in _TONES])
    d = ((pixels[:, None, :] - tones[None]) ** 2).sum(-1)
    hist = np.bincount(d.argmin(1), minlength=len(_TONES)).astype(np.float32)
    return hist / max(1.0, hist.sum())


def _pattern_histogram(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Gradient orientations inside the object (edges of stripes, rings, zigzags…), weighted by
    strength, plus how much of the object is textured at all."""
    grey = image.astype(np.float32).mean(-1)
    gy, gx = np.gradient(grey)
    inner = mask.copy()
    inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    mag = np.hypot(gx, gy)[inner]
    ang = (np.arctan2(gy, gx)[inner] % math.pi) / math.pi
    hist = np.bincount(np.minimum((ang * 8).astype(int), 7), weights=mag, minlength=8)
    textured = float((mag > 20).mean()) if mag.size else 0.0
    hist = hist / max(1e-6, hist.sum())
    return np.concatenate([hist * textured, [textured]])


def shape_scores(image: np.ndarray) -> Dict[str, float]:
    """IoU of the object's mask with each shape fitted at its centre and size."""
    mask = tw.object_mask(image)
    if mask.sum() < 8:
        return {s: 0.0 for s in tw.SHAPES}
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    coords_y, coords_x = np.mgrid[0:h, 0:w].astype(np.float32)
    scores = {}
    for shape in tw.SHAPES:
        best = 0.0
        for angle in (-0.3, 0.0, 0.3):
            for radius in np.linspace(0.25, 0.85, 7) * w / 2:
                ca, sa = math.cos(angle), math.sin(angle)
                dx, dy = (coords_x - cx) / radius, (coords_y - cy) / radius
                u, v = ca * dx + sa * dy, -sa * dx + ca * dy
                tmpl = tw._shape_mask(shape, u, v)
                inter = (tmpl & mask).sum()
                union = (tmpl | mask).sum()
                best = max(best, inter / max(1, union))
        scores[shape] = float(best)
    return scores


def object_shape(image: np.ndarray) -> Optional[str]:
    scores = shape_scores(image)
    shape = max(scores, key=scores.get)
    return shape if scores[shape] > 0.3 else None


def descriptor(image: np.ndarray) -> np.ndarray:
    """A fixed embedding of the main object: colours, pattern and shape (unit length)."""
    mask = tw.object_mask(image)
    if mask.sum() < 8:
        return np.zeros(len(_TONES) + 9 + len(tw.SHAPES), np.float32)
    colours = _colour_histogram(image[mask].astype(np.float32))
    pattern = _pattern_histogram(image, mask)
    scores = shape_scores(image)
    shape = np.array([scores[s] for s in tw.SHAPES], np.float32)
    shape = shape / max(1e-6, np.linalg.norm(shape))
    vec = np.concatenate([colours / max(1e-6, np.linalg.norm(colours)), pattern / max(1e-6, np.linalg.norm(pattern)),
                          shape]).astype(np.float32)
    return vec / max(1e-6, np.linalg.norm(vec))


def subject_reference(subject: tw.Subject, n: int = 24, size: int = 32) -> np.ndarray:
    """Mean descriptor of the subject's own renders (the paper's real photos of the subject)."""
    refs = np.stack([descriptor(im) for im in tw.subject_views(subject, n, seed=12345, size=size)])
    mean = refs.mean(0)
    return mean / max(1e-6, np.linalg.norm(mean))


def subject_fidelity(images: Sequence[np.ndarray], reference: np.ndarray) -> float:
    """Mean cosine similarity of the samples' descriptors to the subject (DINO / CLIP-I analogue)."""
    return float(np.mean([descriptor(im) @ reference for im in images]))


def diversity(images: Sequence[np.ndarray]) -> float:
    """Mean pairwise distance between samples of one prompt (the paper's DIV uses LPIPS)."""
    arr = [im.astype(np.float32) / 255.0 for im in images]
    dists = [float(np.abs(a - b).mean()) for i, a in enumerate(arr) for b in arr[i + 1:]]
    return float(np.mean(dists)) if dists else 0.0


def companion_present(image: np.ndarray, colour: str, min_pixels: int = 4) -> bool:
    """Is there a small object of `colour` in a corner (where the toy world puts companions)?"""
    h, w, _ = image.shape
    k = max(4, h // 4)
    target = np.array(tw.rgb_of(colour), np.float32)
    for y0, x0 in ((0, 0), (0, w - k), (h - k, 0), (h - k, w - k)):
        patch = image[y0:y0 + k, x0:x0 + k].astype(np.float32)
        if (np.sqrt(((patch - target) ** 2).sum(-1)) < 60).sum() >= min_pixels:
            return True
    return False


@dataclass
class Ask:
    """What a prompt asks for that can be checked on a sample."""

    background: Optional[str] = None
    colour: Optional[str] = None
    companion: Optional[str] = None  # its colour
    shape: Optional[str] = None

    def score(self, image: np.ndarray) -> float:
        """Fraction of the asked attributes the sample shows (CLIP-T analogue)."""
        checks: List[bool] = []
        if self.background:
            checks.append(tw.background_colour(image) == self.background)
        if self.colour:
            checks.append(tw.object_colour(image) == self.colour)
        if self.companion:
            checks.append(companion_present(image, self.companion))
        if self.shape:
            checks.append(object_shape(image) == self.shape)
        return float(np.mean(checks)) if checks else float("nan")


@dataclass
class EvalPrompt:
    kind: str
    template: str  # {token} and {class} are filled in
    ask: Ask = field(default_factory=Ask)

    def text(self, token: str, class_noun: str) -> str:
        return self.template.replace("{token}", token).replace("{class}", class_noun)
