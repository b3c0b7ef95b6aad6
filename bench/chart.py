"""chart.png of a benchmark run, drawn with Pillow only.

    python -m bench.chart results.json chart.png

One panel per comparison (seconds per step and peak RSS, ours vs the reference, per model and
inside ComfyUI; class-image sampling time), then the scaling of our trainer with resolution and
with the number of instance images.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw

from dreambooth_core.plots import _font

W, H = 420, 230
OURS, REF, OTHER = (31, 119, 180), (255, 127, 14), (120, 120, 120)


def colour(who: str):
    if who.startswith("ours"):
        return OURS
    if who.startswith("reference") or "TrainLoraNode" in who:
        return REF if "+" not in who else (250, 190, 120)
    return OTHER


def _title(d: ImageDraw.ImageDraw, text: str, font) -> int:
    """Draw a title, wrapped onto two lines if it is too wide; return the y below it."""
    if d.textlength(text, font=font) <= W - 16 or " " not in text:
        d.text((8, 6), text, fill="black", font=font)
        return 26
    words, first = text.split(" "), ""
    while words and d.textlength(first + words[0] + " ", font=font) <= W - 16:
        first += words.pop(0) + " "
    d.text((8, 6), first.strip(), fill="black", font=font)
    d.text((8, 22), " ".join(words), fill="black", font=font)
    return 42


def bar_panel(title: str, bars: List[Tuple[str, Optional[float], tuple]], unit: str) -> Image.Image:
    bh, gap = 18, 6
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    head = _title(probe, title, _font(12))
    img = Image.new("RGB", (W, head + 8 + len(bars) * (bh + gap)), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(12), _font(11)
    y0 = _title(d, title, font) + 4
    vals = [v for _, v, _ in bars if v]
    top = max(vals) if vals else 1.0
    left, right = 180, 64
    for i, (label, v, c) in enumerate(bars):
        y = y0 + i * (bh + gap)
        d.text((8, y + bh // 2 - 6), label[:32], fill="black", font=small)
        if v:
            x1 = left + (W - left - right) * v / top
            d.rectangle([left, y, x1, y + bh], fill=c)
            d.text((x1 + 4, y + bh // 2 - 6), f"{v:.3g} {unit}", fill="black", font=small)
        else:
            d.text((left, y + bh // 2 - 6), "n/a", fill="gray", font=small)
    return img


def line_panel(title: str, xs: List[float], series: List[Tuple[str, List[Optional[float]], tuple]],
               xlabel: str) -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(12), _font(11)
    top = _title(d, title, font) + 4
    left, right, bottom = 50, 16, 34
    vals = [v for _, ys, _ in series for v in ys if v is not None]
    if not xs or not vals:
        d.text((left, H // 2), "no data", fill="gray", font=small)
        return img
    hi = max(vals) * 1.15
    x0, x1 = min(xs), max(xs)
    span = (x1 - x0) or 1

    def pt(x, y):
        return (left + (x - x0) / span * (W - left - right), top + (1 - y / hi) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline=(190, 190, 190))
    for frac in (0, 0.5, 1):
        y = pt(x0, hi * frac)[1]
        d.text((4, y - 6), f"{hi * frac:.3g}", fill="gray", font=small)
    for x in xs:
        px = pt(x, 0)[0]
        d.text((px - 8, H - bottom + 4), f"{x:g}", fill="gray", font=small)
    d.text((W // 2 - 40, H - 16), xlabel, fill="gray", font=small)
    lx = left + 6
    for name, ys, c in series:
        pts = [pt(x, y) for x, y in zip(xs, ys) if y is not None]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=c)
        d.text((lx, top + 4), name, fill=c, font=small)
        lx += 8 + int(d.textlength(name, font=small))
    return img


def panels(results: dict) -> List[Image.Image]:
    rows = results["rows"]
    out = []
    for section in ("train", "comfy"):
        models = []
        for r in rows:
            if r["section"] in (section, section + "-extra") and r["model"] not in models:
                models.append(r["model"])
        for m in models:
            sel = [r for r in rows if r["section"] in (section, section + "-extra") and r["model"] == m]
            res = sel[0]["resolution"]
            paired = any(r.get("pair", 1) > 1 for r in sel)

            def label(r: dict) -> str:
                return f"{r['who']} #{r.get('pair', 1)}" if paired and r["section"] == section else r["who"]

            out.append(bar_panel(f"{m} @ {res}px: seconds per step", [(label(r), r["s_per_step"], colour(r["who"]))
                                                                         for r in sel], "s"))
            out.append(bar_panel(f"{m} @ {res}px: peak RSS", [(label(r), r["peak_rss_mib"] and r["peak_rss_mib"] / 1024,
                                                               colour(r["who"])) for r in sel], "GiB"))
    gen = [r for r in rows if r["section"] == "classgen"]
    for m in dict.fromkeys(r["model"] for r in gen):
        sel = [r for r in gen if r["model"] == m]
        out.append(bar_panel(f"class images, {m}: sampling s", [(r["who"], r["detail"].get("sampling_span_s"),
                                                                 colour(r["who"])) for r in sel], "s"))
    sc, seen = [], set()
    for r in sorted((r for r in rows if r["section"] == "scaling"), key=lambda r: bool(r.get("note"))):
        if (r["resolution"], r["images"]) not in seen:
            seen.add((r["resolution"], r["images"]))
            sc.append(r)
    if sc:
        counts = sorted({r["images"] for r in sc})
        base_n = min(counts, key=lambda n: -sum(1 for r in sc if r["images"] == n))
        by_res = sorted((r for r in sc if r["images"] == base_n), key=lambda r: r["resolution"])
        out.append(line_panel(f"ours: s/step vs resolution ({base_n} images)", [r["resolution"] for r in by_res],
                              [("s/step", [r["s_per_step"] for r in by_res], OURS)], "pixels"))
        out.append(line_panel("ours: peak RSS (GiB) vs resolution", [r["resolution"] for r in by_res],
                              [("peak", [r["peak_rss_mib"] / 1024 for r in by_res], OURS),
                               ("training steps", [(r["training_peak_rss_mib"] or 0) / 1024 or None for r in by_res],
                                (44, 160, 44))], "pixels"))
        res_n = max({r["resolution"] for r in sc}, key=lambda x: sum(1 for r in sc if r["resolution"] == x))
        by_n = sorted((r for r in sc if r["resolution"] == res_n), key=lambda r: r["images"])
        out.append(line_panel(f"ours at {res_n}px vs instance images", [r["images"] for r in by_n],
                              [("s/step", [r["s_per_step"] for r in by_n], OURS),
                               ("setup s (caching)", [r["setup_s"] for r in by_n], (44, 160, 44))], "instance images"))
    return out


def draw(results: dict) -> Image.Image:
    ps = panels(results) or [bar_panel("no results", [], "")]
    cols = 2
    pairs = [ps[i:i + cols] for i in range(0, len(ps), cols)]
    heights = [max(p.height for p in pair) for pair in pairs]
    head = 28
    img = Image.new("RGB", (cols * W + (cols + 1) * 6, head + sum(h + 6 for h in heights) + 6), (235, 235, 235))
    d = ImageDraw.Draw(img)
    h = results.get("headline", {})
    title = "DreamBooth LoRA: ours vs diffusers' train_dreambooth_lora.py"
    if h.get("speedup"):
        title += f"   ({h['model']}: speedup {h['speedup']:.2f}, memory {h['memory']:.2f})"
    d.text((8, 7), title, fill="black", font=_font(14))
    y = head
    for pair, h in zip(pairs, heights):
        for j, p in enumerate(pair):
            img.paste(p, (6 + j * (W + 6), y))
        y += h + 6
    return img


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    results = json.loads(Path(argv[0]).read_text())
    dest = Path(argv[1])
    tmp = dest.with_name(f".{dest.name}.partial.png")
    draw(results).save(tmp)
    tmp.replace(dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
