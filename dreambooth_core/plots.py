"""Pictures of a run, drawn with Pillow only: the loss curve and labelled image grids."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import fileio

SERIES = (("loss", (40, 40, 40)), ("instance_loss", (31, 119, 180)), ("prior_loss", (255, 127, 14)))


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def loss_curve_image(history: Sequence[dict], width: int = 640, height: int = 360) -> Image.Image:
    """Instance, prior and total loss per step (moving average, raw values faint)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    left, right, top, bottom = 56, 16, 28, 36
    draw.text((left, 6), "DreamBooth training loss", fill="black", font=font)
    if not history:
        draw.text((left, height // 2), "no steps recorded", fill="gray", font=font)
        return img
    steps = np.array([h["step"] for h in history], dtype=float)
    series = [(k, c, np.array([h[k] for h in history], dtype=float)) for k, c in SERIES
              if all(h.get(k) is not None for h in history)]
    values = np.concatenate([v for _, _, v in series])
    lo, hi = float(np.min(values)), float(np.percentile(values, 98))
    if hi <= lo:
        hi = lo + 1e-6
    x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)

    def xy(s, v):
        return (left + (s - x0) / (x1 - x0) * (width - left - right),
                top + (1 - (min(v, hi) - lo) / (hi - lo)) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(180, 180, 180))
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        y = xy(x0, v)[1]
        draw.line([left - 4, y, left, y], fill="gray")
        draw.text((4, y - 6), f"{v:.3g}", fill="gray", font=font)
    draw.text((left, height - bottom + 6), f"step {int(x0)}", fill="gray", font=font)
    draw.text((width - right - 70, height - bottom + 6), f"step {int(x1)}", fill="gray", font=font)
    window = max(1, len(steps) // 20)
    legend_x = left + 180
    for key, colour, vals in series:
        faint = tuple(int(c + (255 - c) * 0.75) for c in colour)
        if len(steps) > 1:
            draw.line([xy(s, v) for s, v in zip(steps, vals)], fill=faint, width=1)
            draw.line([xy(s, v) for s, v in zip(steps, _smooth(vals, window))], fill=colour, width=2)
        draw.text((legend_x, 6), key.replace("_", " "), fill=colour, font=font)
        legend_x += 110
    return img


def save_loss_curve(history: Sequence[dict], path: str | Path) -> Path:
    fileio.save_image(path, loss_curve_image(history))
    return Path(path)


def grid_image(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), scale: int = 1, title: Optional[str] = None) -> Image.Image:
    """Images (uint8 H×W×3) in rows, with a label left of each row and above each column."""
    font = _font(13)
    h, w = rows[0][0].shape[:2]
    cell_h, cell_w = h * scale, w * scale
    label_w = 0
    if row_labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = min(420, max(int(probe.textlength(t, font=font)) for t in row_labels) + 16)
    head = (20 if col_labels else 0) + (22 if title else 0)
    ncols = max(len(r) for r in rows)
    img = Image.new("RGB", (label_w + ncols * (cell_w + 4) + 4, head + len(rows) * (cell_h + 4) + 4), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((6, 4), title, fill="black", font=font)
    for j, text in enumerate(col_labels):
        draw.text((label_w + 4 + j * (cell_w + 4), head - 18), text, fill="black", font=font)
    for i, row in enumerate(rows):
        y = head + 4 + i * (cell_h + 4)
        if i < len(row_labels):
            draw.text((6, y + cell_h // 2 - 7), row_labels[i], fill="black", font=font)
        for j, arr in enumerate(row):
            tile = Image.fromarray(arr)
            if scale != 1:
                tile = tile.resize((cell_w, cell_h), Image.NEAREST)
            img.paste(tile, (label_w + 4 + j * (cell_w + 4), y))
    return img
