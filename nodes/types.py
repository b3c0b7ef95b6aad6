"""The objects that travel on the pack's custom sockets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

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
    # Several subjects in one run: how often this subject's photos are drawn relative to the others', the
    # factor of its instance loss, its own class images, and the dataset it was chained onto.
    repeats: int = 1
    loss_weight: float = 1.0
    class_images: Optional["DreamBoothClassImages"] = None
    previous: Optional["DreamBoothDataset"] = None

    def subjects(self) -> List["DreamBoothDataset"]:
        """Every subject of the chain, the first connected first."""
        return (self.previous.subjects() if self.previous is not None else []) + [self]

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
        more = f" + {len(self.subjects()) - 1} chained" if self.previous is not None else ""
        return (f"DreamBoothDataset({len(self.prepared.items)} images, {self.token!r} {self.class_noun!r}, "
                f"{self.source}{more})")


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
