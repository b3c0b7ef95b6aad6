"""The pack's trained subjects as ComfyUI lists them: the files in the `loras` model folders whose
metadata says this pack wrote them (dreambooth_core.adapters.metadata), what each says about itself, and
`GET /dreambooth/subjects` for the page (name, phrase, base, thumbnail) so the node can show the preview.

Headers are read without loading any tensor and cached by modification time and size, so listing stays
cheap when the folder holds many LoRAs.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from ..dreambooth_core.adapters.metadata import Subject

log = logging.getLogger("dreambooth")
ROUTE = "/dreambooth/subjects"
_cache: Dict[str, Tuple[float, int, Optional[Subject]]] = {}


def read(path: str) -> Optional[Subject]:
    """The subject a file describes, or None when it is not one of this pack's (or not readable)."""
    from ..dreambooth_core.adapters.metadata import read_subject
    from ..dreambooth_core.fileio import read_metadata

    try:
        st = os.stat(path)
    except OSError:
        return None
    hit = _cache.get(path)
    if hit and hit[:2] == (st.st_mtime, st.st_size):
        return hit[2]
    subject = None
    if path.lower().endswith(".safetensors"):
        try:
            subject = read_subject(read_metadata(path))
        except (OSError, ValueError):
            subject = None
    _cache[path] = (st.st_mtime, st.st_size, subject)
    return subject


def names() -> List[str]:
    """The `loras` folder names (as the stock LoraLoader lists them) of this pack's subjects."""
    import folder_paths

    return [n for n in folder_paths.get_filename_list("loras")
            if read(folder_paths.get_full_path("loras", n) or "") is not None]


def find(name: str) -> Tuple[str, Subject]:
    """(full path, subject) of a listed subject; ValueError naming the input and what to do."""
    import folder_paths

    path = folder_paths.get_full_path("loras", name) if name else None
    if not path:
        raise ValueError(f"DreamBooth Load Subject: subject {name!r} is not in the loras folder; train one with "
                         "DreamBooth Train (it saves into models/loras), then refresh the page (R) to list it")
    subject = read(path)
    if subject is None:
        raise ValueError(f"DreamBooth Load Subject: {name!r} was not made by DreamBooth (its metadata names no "
                         "subject); load it with the stock Load LoRA node instead")
    return path, subject


def stamp(name: str) -> str:
    """Changes when the file does (for IS_CHANGED: a retrained subject of the same name reloads)."""
    import folder_paths

    path = folder_paths.get_full_path("loras", name) if name else None
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    return f"{name}:{st.st_mtime}:{st.st_size}" if st else name


def listing() -> List[dict]:
    """What the page shows for each subject."""
    import folder_paths

    out = []
    for name in names():
        s = read(folder_paths.get_full_path("loras", name))
        out.append({"name": name, "title": s.title, "phrase": s.phrase, "phrases": list(s.phrases),
                    "family": s.family, "base_model": s.base_model, "thumbnail": s.thumbnail})
    return out


_registered = False


def register_routes() -> bool:
    """`GET /dreambooth/subjects` (also under /api) on the host's server; a no-op without one."""
    global _registered
    inst = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if inst is None or _registered:
        return _registered
    try:
        from aiohttp import web

        @inst.routes.get(ROUTE)
        async def dreambooth_subjects(request):  # noqa: ARG001 (aiohttp handler signature)
            return web.json_response({"subjects": listing()}, headers={"Cache-Control": "no-store"})

        _registered = True
    except Exception as exc:
        log.warning("DreamBooth: %s not registered (Load Subject shows no preview): %s", ROUTE, exc)
    return _registered
