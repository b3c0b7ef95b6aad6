"""`prepare_dataset`: every candidate through decoding, its mask, de-duplication, its caption and
its crop, in that order, and the `PreparedDataset` it returns (the training crops, a report line per
file, and `save` to show the user exactly what the model will train on)."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..fileio import save_image, write_bytes, write_json
from .captions import _attach_captions, _caption
from .crops import CROPS, _check_resolution, _cover_and_crop, _target_size
from .decode import MAX_PIXELS, _check_small, _from_memory, _load_file
from .duplicates import _dhash, _mean_colour, _near_duplicate, _pixel_digest
from .masks import _given_masks, _subject_mask, array_alpha_mask
from .report import _RANK, DatasetError, FileReport, _Log, _Skip
from .sources import _gather


@dataclass
class TrainImage:
    image: Image.Image  # RGB at its training size (both sides multiples of 8)
    caption: str
    source: str  # path relative to the input folder, or "memory[i]"
    mask: Optional[Image.Image] = None  # "L", the image's size; 255 = the subject (masked loss)
    # Several subjects in one run (concepts.py): how often this image is drawn relative to others (kohya's
    # subset repeats), what its instance loss is multiplied by, and the class prompt whose class images
    # preserve its class ("" in a one-subject run: every class image does).
    repeats: int = 1
    loss_weight: float = 1.0
    class_prompt: str = ""
    # A model's own class sample as its latents (C, h, w), which training uses as they are: set where the
    # model's VAE decodes only a preview that would not encode back into them (class_images.cache)
    latent: Optional[Any] = None


@dataclass
class PreparedDataset:
    items: List[TrainImage]
    report: List[FileReport]
    flip: bool  # whether the trainer may mirror these images horizontally
    resolution: int
    crop: str = "center"

    def counts(self) -> dict:
        out = {k: 0 for k in _RANK}
        for r in self.report:
            out[r.status] += 1
        return out

    def summary(self) -> str:
        """One line for a console or a node's status text."""
        sizes: dict = {}
        for it in self.items:
            key = f"{it.image.width}x{it.image.height}"
            sizes[key] = sizes.get(key, 0) + 1
        size_text = ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]))
        c = self.counts()
        masked = sum(it.mask is not None for it in self.items)
        return (f"{len(self.items)} image(s) ready ({size_text or 'none'}); {c['fixed']} fixed, "
                f"{c['warning']} with warnings, {c['skipped']} skipped; crop={self.crop}, "
                f"flip={'on' if self.flip else 'off'}" + (f"; {masked} with a subject mask" if masked else ""))

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write the training crops (PNG) with sidecar captions (.txt), report.json and report.txt,
        so the user can see exactly what the model will train on."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for i, item in enumerate(self.items):
            stem = f"{i:04d}_{_safe_stem(item.source)}"
            save_image(out / f"{stem}.png", item.image)
            write_bytes(out / f"{stem}.txt", (item.caption + "\n").encode("utf-8"))
            files.append({"file": f"{stem}.png", "caption": item.caption, "source": item.source,
                          "size": [item.image.width, item.image.height]})
            if item.mask is not None:
                save_image(out / "masks" / f"{stem}.png", item.mask)  # a subfolder: never read as a photo
                files[-1]["mask"] = f"masks/{stem}.png"
        write_json(out / "report.json", {"resolution": self.resolution, "crop": self.crop, "flip": self.flip,
                                         "summary": self.summary(), "items": files,
                                         "report": [asdict(r) for r in self.report]})
        write_bytes(out / "report.txt", self.report_text().encode("utf-8"))

    def report_text(self) -> str:
        lines = [self.summary(), ""]
        captions = {it.source: it.caption for it in self.items}
        for r in self.report:
            size = f" -> {r.size[0]}x{r.size[1]}" if r.size else ""
            orig = f" {r.original_size[0]}x{r.original_size[1]}" if r.original_size else ""
            lines.append(f"[{r.status:>7}] {r.source}{orig}{size}" +
                         (f": {captions[r.source]!r}" if r.source in captions else ""))
            lines.extend(f"          - {n}" for n in r.notes)
        return "\n".join(lines) + "\n"


def _safe_stem(source: str) -> str:
    stem = source.rsplit(".", 1)[0] if "." in source.rsplit("/", 1)[-1] else source
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:60] or "image"


def prepare_dataset(source: Any, *, token: str, class_noun: str,
                    caption_template: str = "a photo of {token} {class}", resolution: int = 512,
                    crop: str = "center", flip: bool = False, recursive: bool = False,
                    min_size: Optional[int] = None, seed: int = 0, use_captions: bool = True,
                    max_pixels: int = MAX_PIXELS, masks: Any = None,
                    captions: Optional[Sequence[str]] = None) -> PreparedDataset:
    """Load, validate, fix, caption and crop the subject's images; report on every file.

    `source`: a folder, a list of image files, or a list of in-memory images (PIL, numpy
    H×W×3 uint8 / float [0, 1], torch tensors; a whole B×H×W×3 batch is accepted too).
    `masks`: subject masks for a masked loss (see masks.py): "alpha" reads each image's alpha
    channel (cut-outs), or one mask per in-memory image (a B×H×W batch such as ComfyUI's MASK).
    `captions`: one per image, in the order given (a host's image-text loader); an empty one falls
    back to the sidecar file or the template; {token} and {class} are filled in.
    Raises DatasetError when no usable image remains."""
    _check_resolution(resolution)
    if crop not in CROPS:
        raise ValueError(f"crop: {crop!r} is not one of {', '.join(CROPS)}")
    min_size = resolution // 2 if min_size is None else int(min_size)
    cands, where, hint = _gather(source, recursive)
    _attach_captions(captions, cands)
    given_masks = _given_masks(masks, cands)
    from_alpha = masks is not None and given_masks is None

    report: List[FileReport] = []
    kept: List[Tuple[TrainImage, FileReport, int, np.ndarray]] = []
    exact: dict = {}
    for index, cand in enumerate(cands):
        log = _Log()
        rep = FileReport(cand.name, "ok")
        try:
            alpha = None
            if cand.path is not None:
                img, rep.original_size, alpha = _load_file(cand, resolution=resolution, crop=crop, min_size=min_size,
                                                           max_pixels=max_pixels, log=log, want_alpha=from_alpha)
            else:
                img = _from_memory(cand.obj, log)
                rep.original_size = img.size
                _check_small(img.size, min_size, resolution)
                if from_alpha:
                    alpha = array_alpha_mask(cand.obj)
            mask = _subject_mask(masks, given_masks, index, alpha, img.size, log)
            digest = _pixel_digest(img)
            if digest in exact:
                raise _Skip(f"exact duplicate of {exact[digest]}: dropped")
            exact[digest] = cand.name
            dhash, colour = _dhash(img), _mean_colour(img)
            near = _near_duplicate(dhash, colour, ((k[0].source, k[2], k[3]) for k in kept))
            if near is not None:
                log.warn(f"near duplicate of {near[0]} (dHash distance {near[1]}/64): kept, but "
                         "near-identical photos add little and favour overfitting")
            caption = _caption(cand, token, class_noun, caption_template, use_captions, log)
            target = _target_size(img.width, img.height, resolution, crop)
            out, scale = _cover_and_crop(img, target, crop, f"{seed}:{cand.name}")
            if scale > 1.0 + 1e-6:
                log.warn(f"small image ({img.width}x{img.height}) upscaled x{scale:.2f} to {target[0]}x{target[1]}: "
                         f"it may look soft; photos of at least {resolution} px on the shorter side train better")
            rep.size = out.size
            if mask is not None:
                mask = _cover_and_crop(mask, target, crop, f"{seed}:{cand.name}")[0]
            kept.append((TrainImage(out, caption, cand.name, mask), rep, dhash, colour))
        except _Skip as skip:
            log.add("skipped", str(skip))
        rep.status, rep.notes = log.status, log.notes
        report.append(rep)

    if not kept:
        reasons = "; ".join(f"{r.source}: {r.notes[-1]}" for r in report[:5] if r.notes)
        more = f" (and {len(report) - 5} more)" if len(report) > 5 else ""
        found = f"{len(report)} file(s) skipped — {reasons}{more}" if report else "no image files found"
        tip = hint or (f"add JPEG/PNG/WebP photos of the subject, at least {max(min_size, 1)} px on the shorter side")
        raise DatasetError(f"No usable image in {where}: {found}. {tip[0].upper() + tip[1:]}.")
    if from_alpha and all(k[0].mask is None for k in kept):
        raise DatasetError(f"masks='alpha': none of the images in {where} has an alpha channel; cut the subject out "
                           "(a PNG/WebP with a transparent background) or train without masks")
    return PreparedDataset([k[0] for k in kept], report, flip=flip, resolution=resolution, crop=crop)
