"""One candidate to an upright RGB image, or a reason to skip it.

Files: unreadable, empty, truncated and not-an-image files, wrong extensions, animations, EXIF
orientation, too-small photos and decompression bombs (huge JPEGs are decoded at a reduced DCT
scale instead). In-memory images: PIL images, numpy arrays and torch tensors of any usual dtype.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .colour import _composite, _gray_to_uint8, _to_rgb
from .crops import _target_size
from .masks import alpha_mask
from .report import _Log, _Skip
from .sources import IMAGE_EXTS, _Candidate

#: Most pixels decoded at full size (~200 MB as RGB). Bigger JPEGs are decoded at a reduced
#: scale (libjpeg's DCT scaling never allocates the full image); other formats are refused.
MAX_PIXELS = 8192 * 8192
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
        alpha = alpha_mask(im) if want_alpha else None
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
