"""What a source holds: a folder's candidate files (hidden and system files, non-images and, unless
recursive, subfolders left out), a list of files, or in-memory images, each under the name its
report line will carry."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

from PIL import Image

from .report import DatasetError

IMAGE_EXTS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif", ".tif",
              ".tiff", ".avif", ".heic", ".heif", ".jp2", ".tga", ".ppm", ".pgm", ".pbm", ".pnm"}
# Extensions that are obviously not images: ignored without a report line.
_QUIET_EXTS = {".txt", ".caption", ".md", ".json", ".yaml", ".yml", ".toml", ".csv", ".tsv", ".log",
               ".ini", ".cfg", ".py", ".html", ".htm", ".xml", ".pdf", ".rtf", ".doc", ".docx",
               ".safetensors", ".ckpt", ".pt", ".zip", ".xmp", ".aae", ".db"}
_SYSTEM_FILES = {"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r", ".ds_store"}
_SYSTEM_DIRS = {"__macosx", "$recycle.bin", "system volume information"}


@dataclass
class _Candidate:
    name: str
    path: Optional[Path] = None
    obj: Any = None
    caption: str = ""  # the caller's caption for this image ("": the sidecar file or the template)


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


def _gather(source: Any, recursive: bool) -> Tuple[List[_Candidate], str, Optional[str]]:
    """(candidates, where-text for messages, a tip for when none is usable) for any source."""
    if isinstance(source, (str, os.PathLike)) and str(source).strip() and Path(source).is_dir():
        root = Path(os.path.abspath(source))
        paths, nested = _list_folder(root, recursive)
        cands = [_Candidate(p.relative_to(root).as_posix(), path=p) for p in paths]
        hint = "images were found in subfolders: pass recursive=True to use them" if nested else None
        return cands, str(root), hint
    cands, where = _candidates(source)
    return cands, where, None


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
