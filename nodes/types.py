"""The objects that travel on the pack's custom sockets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DATASET = "DREAMBOOTH_DATASET"
CLASS_IMAGES = "DREAMBOOTH_CLASS_IMAGES"


@dataclass
class DreamBoothDataset:
    """Prepared instance images (dreambooth_core.dataset.PreparedDataset) and how they are captioned."""

    prepared: Any  # PreparedDataset
    token: str
    class_noun: str
    caption_template: str
    source: str  # folder path, or "IMAGE input"
    token_message: str = ""

    @property
    def resolution(self) -> int:
        return self.prepared.resolution

    @property
    def crop(self) -> str:
        return self.prepared.crop

    @property
    def flip(self) -> bool:
        return self.prepared.flip

    def __repr__(self) -> str:  # shown by the host in error reports
        return f"DreamBoothDataset({len(self.prepared.items)} images, {self.token!r} {self.class_noun!r}, {self.source})"


@dataclass
class DreamBoothClassImages:
    """A cached class-image set (dreambooth_core.class_images.cache.ClassImageSet) for prior preservation."""

    image_set: Any  # ClassImageSet
    resolution: int

    @property
    def prompt(self) -> str:
        return self.image_set.prompt

    def __repr__(self) -> str:
        s = self.image_set
        return f"DreamBoothClassImages({len(s.paths)} x {self.resolution}px, {s.prompt!r}, {s.folder})"
