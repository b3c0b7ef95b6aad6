"""Instance (and user-supplied class) images that survive real-world input.

DreamBooth learns from 3-30 photos, so every one counts and every one is a chance for a
surprise: phone photos stored sideways with an EXIF flag, CMYK or 16-bit exports, transparent
PNGs, GIFs, truncated downloads, files with the wrong extension, decompression bombs, the same
photo twice. Each file is validated, fixed where the fix is unambiguous, and otherwise skipped
with a reason, so the user learns what happened to each file instead of getting a traceback or,
worse, silently training on a black square. Everything here is host-independent: the trainer,
the CLI and the ComfyUI/WebUI adapters all call `prepare_dataset`.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import masks as mk
from ..fileio import save_image, write_bytes, write_json

CROPS = ("center", "random", "bucket")
#: Most pixels decoded at full size (~200 MB as RGB). Bigger JPEGs are decoded at a reduced
#: scale (libjpeg's DCT scaling never allocates the full image); other formats are refused.
MAX_PIXELS = 8192 * 8192
#: Neutral mid-grey that transparent areas are composited on: black or white backgrounds would
#: teach the model a dark or bright halo around cut-out subjects.
ALPHA_BACKGROUND = (128, 128, 128)
#: dHash Hamming distance (of 64 bits) at or below which two images count as near duplicates.
NEAR_DUPLICATE_BITS = 6
#: ...and the largest per-channel mean-colour difference (0-255): dHash only sees luminance
#: gradients, so flat images of different colours would otherwise all look alike.
NEAR_DUPLICATE_COLOUR = 24

IMAGE_EXTS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif", ".tif",
              ".tiff", ".avif", ".heic", ".heif", ".jp2", ".tga", ".ppm", ".pgm", ".pbm", ".pnm"}
CAPTION_EXTS = (".txt", ".caption")
# Extensions that are obviously not images: ignored without a report line.
_QUIET_EXTS = {".txt", ".caption", ".md", ".json", ".yaml", ".yml", ".toml", ".csv", ".tsv", ".log",
               ".ini", ".cfg", ".py", ".html", ".htm", ".xml", ".pdf", ".rtf", ".doc", ".docx",
               ".safetensors", ".ckpt", ".pt", ".zip", ".xmp", ".aae", ".db"}
_SYSTEM_FILES = {"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r", ".ds_store"}
_SYSTEM_DIRS = {"__macosx", "$recycle.bin", "system volume information"}
_FORMAT_EXTS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"}, "MPO": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "PNG": {".png"}, "WEBP": {".webp"}, "GIF": {".gif"}, "BMP": {".bmp", ".dib"},
    "TIFF": {".tif", ".tiff"}, "AVIF": {".avif"}, "JPEG2000": {".jp2"}, "TGA": {".tga"},
    "PPM": {".ppm", ".pgm", ".pbm", ".pnm"},
}
_ORIENTATION = {  # EXIF orientation → (PIL transpose, note)
    2: (Image.Transpose.FLIP_LEFT_RIGHT, "EXIF orientation: mirrored horizontally"),
    3: (Image.Transpose.ROTATE_180, "EXIF rotated 180°"),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, "EXIF orientation: mirrored vertically"),
    5: (Image.Transpose.TRANSPOSE, "EXIF orientation: mirrored and rotated 90°"),
    6: (Image.Transpose.ROTATE_270, "EXIF rotated 90° clockwise"),
    7: (Image.Transpose.TRANSVERSE, "EXIF orientation: mirrored and rotated 90°"),
    8: (Image.Transpose.ROTATE_90, "EXIF rotated 90° counter-clockwise"),
}
_RANK = {"ok": 0, "fixed": 1, "warning": 2, "skipped": 3}


class DatasetError(ValueError):
    """No usable image remains; the message says why and what to do."""


@dataclass
class TrainImage:
    image: Image.Image  # RGB at its training size (both sides multiples of 8)
    caption: str
    source: str  # path relative to the input folder, or "memory[i]"
    mask: Optional[Image.Image] = None  # "L", the image's size; 255 = the subject (masked loss)


@dataclass
class FileReport:
    source: str
    status: str  # "ok" | "fixed" | "warning" | "skipped"
    notes: List[str] = field(default_factory=list)
    size: Optional[Tuple[int, int]] = None  # (w, h) it was trained at
    original_size: Optional[Tuple[int, int]] = None  # (w, h) upright, as stored in the file


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


# ---------------------------------------------------------------------------------------------
# buckets and crops


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


# ---------------------------------------------------------------------------------------------
# per-file bookkeeping


class _Skip(Exception):
    pass


class _Log:
    def __init__(self) -> None:
        self.notes: List[str] = []
        self.status = "ok"

    def add(self, status: str, note: str) -> None:
        self.notes.append(note)
        if _RANK[status] > _RANK[self.status]:
            self.status = status

    def fixed(self, note: str) -> None:
        self.add("fixed", note)

    def warn(self, note: str) -> None:
        self.add("warning", note)


@dataclass
class _Candidate:
    name: str
    path: Optional[Path] = None
    obj: Any = None
    caption: str = ""  # the caller's caption for this image ("": the sidecar file or the template)


# ---------------------------------------------------------------------------------------------
# listing


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SYSTEM_FILES


def _list_folder(root: Path, recursive: bool) -> Tuple[List[Path], bool]:
    """Candidate files under `root` (sorted), and whether images sit in subfolders not searched
    (looked for one level deep only, so pointing at a huge tree stays cheap)."""
    found: List[Path] = []
    nested_images = False
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d) and d.lower() not in _SYSTEM_DIRS)
        names = [n for n in filenames if not _is_hidden(n) and Path(n).suffix.lower() not in _QUIET_EXTS]
        if here != root and not recursive:
            nested_images = nested_images or any(Path(n).suffix.lower() in IMAGE_EXTS for n in names)
            dirnames[:] = []
            continue
        found.extend(here / n for n in names)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found, nested_images


def _candidates(source: Any) -> Tuple[List[_Candidate], str]:
    """(candidates, where-text for messages) for a file, a list of files or in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not str(source).strip() or not path.exists() and not path.is_symlink():
            raise DatasetError(f"source {str(path)!r}: no such file or folder; "
                               "pass the folder holding the subject's photos")
        source = [path]
    if _is_batch(source):
        source = list(source)
    if not isinstance(source, (list, tuple)):
        raise DatasetError("source: expected a folder, a list of image files or a list of images, "
                           f"got {type(source).__name__}")
    if not source:
        raise DatasetError("source: the list is empty; give at least one image of the subject")
    if all(isinstance(s, (str, os.PathLike)) for s in source):
        paths = [Path(os.path.abspath(s)) for s in source]
        try:
            base = Path(os.path.commonpath([str(p.parent) for p in paths]))
        except ValueError:  # Windows: files on different drives
            base = Path(paths[0].anchor)
        names = {p: p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix() for p in paths}
        paths.sort(key=lambda p: names[p])
        return [_Candidate(names[p], path=p) for p in paths], str(base)
    if any(isinstance(s, (str, os.PathLike)) for s in source):
        raise DatasetError("source: mixes file paths and in-memory images; pass one kind")
    return [_Candidate(f"memory[{i}]", obj=s) for i, s in enumerate(source)], "the given images"


def _is_batch(source: Any) -> bool:
    """A whole image batch (numpy B×H×W×C, or a ComfyUI IMAGE tensor) passed as the source."""
    shape = getattr(source, "shape", None)
    return shape is not None and len(shape) == 4 and not isinstance(source, Image.Image)


# ---------------------------------------------------------------------------------------------
# decoding files


def _open_unlimited(fp) -> Image.Image:
    """Open a header that Pillow refused as a decompression bomb, so our own checks can decide
    (a huge JPEG can still be decoded safely at 1/8 scale). Only the header is read here."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        fp.seek(0)
        return Image.open(fp)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _not_an_image(head: bytes, ext: str) -> str:
    sample = head[:512]
    texty = sample and all(b in b"\t\n\r" or 32 <= b < 127 or b >= 128 for b in sample)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        texty = False
    what = "text" if texty else "data in no image format Pillow can read"
    hint = ""
    if ext in (".heic", ".heif"):
        hint = " (HEIC needs the pillow-heif plugin; or export the photo as JPEG)"
    elif ext in (".avif",):
        hint = " (this Pillow build cannot read AVIF; export as JPEG or PNG)"
    despite = f" despite its {ext} extension" if ext in IMAGE_EXTS else ""
    return f"not an image: the file holds {what}{despite}{hint}"


def _orientation(im: Image.Image, log: _Log) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # corrupt EXIF blocks are common in edited photos
        log.warn("EXIF data unreadable; orientation could not be checked")
        return 1
    return value if value in _ORIENTATION else 1


def _load_file(cand: _Candidate, *, resolution: int, crop: str, min_size: int, max_pixels: int,
               log: _Log, want_alpha: bool = False) -> Tuple[Image.Image, Tuple[int, int], Optional[Image.Image]]:
    """Decode one file to an upright RGB image (maybe decoded at reduced scale), its upright
    size in the file and, with `want_alpha`, its upright alpha channel (None without one), or raise
    _Skip with the reason."""
    path = cand.path
    assert path is not None
    ext = path.suffix.lower()
    if path.is_symlink() and not path.exists():
        raise _Skip(f"broken symbolic link (points to {os.readlink(path)}); fix or remove the link")
    try:
        if path.stat().st_size == 0:
            raise _Skip("empty file (0 bytes); copy or export it again")
        fp = open(path, "rb")
    except PermissionError:
        raise _Skip("cannot read: permission denied; fix the file's permissions (e.g. chmod 644)") from None
    except OSError as e:
        raise _Skip(f"cannot read: {e.strerror or e}") from None
    with fp:
        head = fp.read(512)
        fp.seek(0)
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError:
            im = _open_unlimited(fp)
        except UnidentifiedImageError:
            raise _Skip(_not_an_image(head, ext)) from None
        except Exception as e:
            raise _Skip(f"unreadable image header ({e}); export the image again") from None
        fmt = im.format or "?"
        if ext in IMAGE_EXTS and fmt in _FORMAT_EXTS and ext not in _FORMAT_EXTS[fmt]:
            log.fixed(f"content is {fmt} but the extension is {ext}: loaded as {fmt}")
        elif ext not in IMAGE_EXTS:
            log.fixed(f"no image extension ({ext or 'none'}) but the content is {fmt}: loaded")
        frames = getattr(im, "n_frames", 1) if fmt != "MPO" else 1  # MPO: JPEG + depth/preview
        if frames > 1:
            im.seek(0)
            log.fixed(f"animated/multi-frame image: used the first frame of {frames}")
        orientation = _orientation(im, log)
        w, h = im.size
        upright = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        _check_small(upright, min_size, resolution)
        if fmt in ("JPEG", "MPO"):
            # Decode at a reduced DCT scale (1/2, 1/4, 1/8) while the result still covers twice
            # the training size, or until it fits max_pixels: huge photos then never exist at
            # full size in memory (and load several times faster).
            tw, th = _target_size(*upright, resolution, crop)
            need = 2 * max(tw / upright[0], th / upright[1])
            k = 1
            for cand in (2, 4, 8):
                if w // cand and h // cand and (need * cand <= 1 or w * h / (k * k) > max_pixels):
                    k = cand
            if k > 1:
                im.draft(None, (w // k, h // k))
        if im.size[0] * im.size[1] > max_pixels:
            raise _Skip(f"too large to decode safely: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the "
                        f"{max_pixels / 1e6:.0f} MP limit; downscale it (e.g. to 4096 px) and add it again")
        if w * h > max_pixels:
            log.fixed(f"downscaled from {w}x{h} while decoding (huge image, decoded at {im.size[0]}x{im.size[1]})")
        try:
            im.load()
        except Exception as e:
            raise _Skip(f"truncated or corrupt image data ({e}); download or export it again") from None
        rgb = _to_rgb(im, log)
        alpha = mk.alpha_mask(im) if want_alpha else None
    if orientation != 1:
        method, note = _ORIENTATION[orientation]
        rgb = rgb.transpose(method)
        alpha = alpha.transpose(method) if alpha is not None else None
        log.fixed(note)
    return rgb, upright, alpha


def _check_small(size: Tuple[int, int], min_size: int, resolution: int) -> None:
    short = min(size)
    if short < min_size:
        raise _Skip(f"too small: {size[0]}x{size[1]}; its shorter side ({short} px) is below min_size "
                    f"{min_size}; use photos at least {resolution} px on the shorter side")


# ---------------------------------------------------------------------------------------------
# colour modes


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


def _from_memory(obj: Any, log: _Log) -> Image.Image:
    """A PIL image, a numpy H×W×C array (uint8, uint16 or float in [0, 1]) or a torch tensor."""
    if isinstance(obj, Image.Image):
        im = obj
        orientation = _orientation(im, log)
        rgb = _to_rgb(im, log)
        if orientation != 1:
            method, note = _ORIENTATION[orientation]
            rgb = rgb.transpose(method)
            log.fixed(note)
        return rgb
    if hasattr(obj, "detach"):  # torch tensor (a slice of a ComfyUI IMAGE batch)
        obj = obj.detach().cpu().float().numpy()
    if not hasattr(obj, "__array__") and not isinstance(obj, np.ndarray):
        raise _Skip(f"unsupported in-memory object {type(obj).__name__}; pass PIL images or H×W×3 arrays")
    arr = np.asarray(obj)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
        log.fixed("channels-first array transposed to H×W×C")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise _Skip(f"unsupported array shape {tuple(arr.shape)}; expected H×W×3 (or H×W, H×W×4)")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise _Skip("array contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if hi > 1.0 + 1e-3 and hi <= 255.0 and lo >= 0:
            log.warn(f"float values up to {hi:.0f}: read as 0-255, not 0-1")
            arr = arr / 255.0
        elif lo < -1e-3 or hi > 1.0 + 1e-3:
            log.warn(f"float values in [{lo:.2f}, {hi:.2f}] clipped to [0, 1]")
        arr = np.clip(np.rint(np.clip(arr, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype == np.uint16:
        arr = _gray_to_uint8(arr, 65535.0, log, "uint16 array")
    elif arr.dtype != np.uint8:
        if arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255:
            raise _Skip(f"unsupported array: dtype {arr.dtype} with values outside 0-255; use uint8 or float in [0, 1]")
        arr = arr.astype(np.uint8)
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2:
        log.fixed("grayscale converted to RGB")
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.shape[-1] == 4:
        return _composite(Image.fromarray(arr, "RGBA"), log, "RGBA image")
    return Image.fromarray(arr, "RGB")


# ---------------------------------------------------------------------------------------------
# subject masks


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
            mask = mk.to_mask(given[index], f"masks[{index}]")
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
    if mask.size != size:
        if abs(mask.width / mask.height - size[0] / size[1]) > 0.01:
            raise DatasetError(f"masks[{index}]: {mask.width}x{mask.height} does not have the shape of its image "
                               f"({size[0]}x{size[1]}); give each image a mask of its own aspect ratio")
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    if mk.coverage(mask) < 1e-3:
        raise _Skip("its subject mask is empty (marks nothing to learn); fix the mask or leave the image out")
    return mask


# ---------------------------------------------------------------------------------------------
# captions


def _decode_text(data: bytes) -> Tuple[str, Optional[str]]:
    """(text, encoding used when it was not UTF-8)."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace"), None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace"), "UTF-16"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def _attach_captions(captions: Optional[Sequence[str]], cands: Sequence[_Candidate]) -> None:
    if captions is None:
        return
    if isinstance(captions, str) or len(captions) != len(cands):
        n = "one string, not a list," if isinstance(captions, str) else f"{len(captions)} caption(s)"
        raise DatasetError(f"captions: {n} for {len(cands)} image(s); give one caption per image, in order "
                           "(an empty one uses the caption template)")
    for cand, text in zip(cands, captions):
        cand.caption = str(text or "")


def fill_caption(text: str, token: str, class_noun: str) -> str:
    """Fill {token} and {class} (plain replacement: captions may hold other braces)."""
    return " ".join(text.replace("{token}", token).replace("{class}", class_noun).split())


def _sidecar(path: Path) -> Optional[Path]:
    for cand in [path.with_suffix(ext) for ext in CAPTION_EXTS] + [path.with_name(path.name + ".txt")]:
        if cand != path and cand.is_file():
            return cand
    return None


def _caption(cand: _Candidate, token: str, class_noun: str, template: str, use_captions: bool, log: _Log) -> str:
    caption = fill_caption(cand.caption if cand.caption.strip() else template, token, class_noun)
    side = _sidecar(cand.path) if (use_captions and cand.path is not None and not cand.caption.strip()) else None
    if side is not None:
        try:
            text, encoding = _decode_text(side.read_bytes())
        except OSError as e:
            log.warn(f"caption file {side.name} unreadable ({e.strerror or e}); used the template")
            text, encoding = "", None
        else:
            if encoding:
                log.fixed(f"caption file {side.name} is not UTF-8: decoded as {encoding}")
            if not text.strip():
                log.warn(f"caption file {side.name} is empty; used the template")
        if text.strip():
            caption = fill_caption(text, token, class_noun)
    if token and not re.search(rf"(?<![A-Za-z0-9]){re.escape(token)}(?![A-Za-z0-9])", caption, re.IGNORECASE):
        log.warn(f"caption {caption!r} does not contain the identifier {token!r}: the subject would not be "
                 "bound to it; add {token} to the caption")
    return caption


# ---------------------------------------------------------------------------------------------
# duplicates


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


# ---------------------------------------------------------------------------------------------


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise ValueError(f"resolution: {resolution!r} is not a positive multiple of 8 (e.g. 512)")


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
    hint = None
    if isinstance(source, (str, os.PathLike)) and str(source).strip() and Path(source).is_dir():
        root = Path(os.path.abspath(source))
        paths, nested = _list_folder(root, recursive)
        cands = [_Candidate(p.relative_to(root).as_posix(), path=p) for p in paths]
        where = str(root)
        if nested:
            hint = "images were found in subfolders: pass recursive=True to use them"
    else:
        cands, where = _candidates(source)
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
                    alpha = mk.array_alpha_mask(cand.obj)
            mask = _subject_mask(masks, given_masks, index, alpha, img.size, log)
            digest = _pixel_digest(img)
            if digest in exact:
                raise _Skip(f"exact duplicate of {exact[digest]}: dropped")
            exact[digest] = cand.name
            dhash, colour = _dhash(img), _mean_colour(img)
            for other, orep, ohash, ocolour in kept:
                dist = bin(dhash ^ ohash).count("1")
                if dist <= NEAR_DUPLICATE_BITS and np.abs(colour - ocolour).max() <= NEAR_DUPLICATE_COLOUR:
                    log.warn(f"near duplicate of {other.source} (dHash distance {dist}/64): kept, but "
                             "near-identical photos add little and favour overfitting")
                    break
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
