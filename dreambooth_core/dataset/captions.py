"""Each image's caption: the caller's own, else a sidecar .txt/.caption file (any common encoding),
else the template; {token} and {class} filled in, and a warning where the identifier is missing."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Tuple

from .report import DatasetError, _Log
from .sources import _Candidate

CAPTION_EXTS = (".txt", ".caption")


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
