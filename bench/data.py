"""Instance photos and class-image folders that both trainers read.

Instance photos are toy-world renders of a pink star (each on its own background), written
as PNG at the training resolution so that neither trainer resizes or crops anything. Class
images are generated once by our ``class-images`` command and then written (image files only,
at the training resolution: ``bench.prepare resize``) into a plain folder: the reference script
reads every file of its class folder as an image, so the cache's manifest and lock must not be
there.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def subject():
    """The subject that the bench's prompts name ('a photo of sks star'): a pink star with cyan
    diagonal stripes. Imported on call: the orchestrator runs on the standard library alone."""
    from dreambooth_core.embedded import toyworld

    return toyworld.EVAL_SUBJECTS[0]


def instance_folder(root: Path, resolution: int, count: int, seed: int = 7) -> Path:
    """`count` renders of the bench's subject at `resolution` px, written once. The completion marker
    lies beside the folder, not in it: the reference script reads every entry of the folder."""
    from PIL import Image

    from dreambooth_core.embedded import toyworld

    folder = root / f"instance_{resolution}px_{count}"
    marker = root / f".instance_{resolution}px_{count}.complete"
    if marker.is_file() and folder.is_dir():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    views = toyworld.subject_views(subject(), count, seed=seed, size=resolution)
    for i, arr in enumerate(views):
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    marker.write_text("ok")
    return folder


def images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
