"""What each file ends up as: its status and notes, and the error that ends a run.

Every step of the pipeline records what it fixed or doubts in a file's `_Log` and raises `_Skip`
to drop the file with a reason; `DatasetError` is for the caller (nothing usable remains, or an
argument is wrong), so a user always learns what happened to each file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

_RANK = {"ok": 0, "fixed": 1, "warning": 2, "skipped": 3}


class DatasetError(ValueError):
    """No usable image remains; the message says why and what to do."""


@dataclass
class FileReport:
    source: str
    status: str  # "ok" | "fixed" | "warning" | "skipped"
    notes: List[str] = field(default_factory=list)
    size: Optional[Tuple[int, int]] = None  # (w, h) it was trained at
    original_size: Optional[Tuple[int, int]] = None  # (w, h) upright, as stored in the file


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
