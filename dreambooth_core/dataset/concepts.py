"""Several subjects in one training run ("concepts", like kohya's dataset subsets and OneTrainer's
concepts): each has its own photos, identifier, class noun, repeats and loss weight.

A concept list comes from a file (the command line's `--concepts`), a config's `concepts` or a host's
chained dataset nodes; it is checked before any work (values, distinct identifiers), and the subjects'
prepared photos are combined into one training set whose images carry their subject's repeats, loss
weight and class prompt, which is all the trainer's draw needs (training/draw.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from .prepare import PreparedDataset
from .report import DatasetError
from .tokens import require_distinct_identifiers

#: the keys a concept file's entry may have (a run's config.json also records each one's `images`)
CONCEPT_KEYS = ("instance_dir", "token", "class_noun", "repeats", "loss_weight", "class_dir")
_RECORDED = ("images",)


@dataclass
class Concept:
    """One subject of a run. `repeats`: how often its photos are drawn relative to other subjects'
    (an image of a concept with repeats 2 is drawn twice as often as one with repeats 1); `loss_weight`
    multiplies its instance loss; `class_dir`: its class images (or where generated ones are cached)."""

    instance_dir: Optional[str]
    token: str
    class_noun: str = ""
    repeats: int = 1
    loss_weight: float = 1.0
    class_dir: Optional[str] = None
    images: int = 0  # photos prepared for it: filled in by the run, for the saved file's metadata

    @property
    def phrase(self) -> str:
        return f"{self.token} {self.class_noun}".strip()

    def to_dict(self) -> dict:
        return asdict(self)


def parse_concepts(entries: Any, source: str = "concepts", base_dir: Optional[Path] = None) -> List[Concept]:
    """Concepts from a list of mappings (a file's or a config's); folders given relative are taken
    relative to `base_dir` (the concept file's folder). Raises ValueError naming the entry and key."""
    if isinstance(entries, Mapping) and "concepts" in entries:
        entries = entries["concepts"]
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError(f"{source}: expected a list of concepts (objects with {', '.join(CONCEPT_KEYS)}), "
                         f"got {type(entries).__name__ if entries else 'nothing'}")
    return [_concept(entry, f"{source}[{i}]", base_dir) for i, entry in enumerate(entries)]


def _concept(entry: Any, where: str, base_dir: Optional[Path]) -> Concept:
    if isinstance(entry, Concept):
        return entry
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected an object with {', '.join(CONCEPT_KEYS)}, got {entry!r}")
    data = {str(k).replace("-", "_"): v for k, v in entry.items()}
    unknown = sorted(set(data) - set(CONCEPT_KEYS) - set(_RECORDED))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; a concept has {', '.join(CONCEPT_KEYS)}")
    if not str(data.get("token") or "").strip():
        raise ValueError(f"{where}: 'token' is missing: give the subject's rare identifier (e.g. sks)")
    for key in ("instance_dir", "class_dir"):
        if data.get(key) and base_dir is not None and not Path(str(data[key])).expanduser().is_absolute():
            data[key] = str(Path(base_dir) / str(data[key]))
    try:
        repeats = _whole(data.get("repeats", 1))
        loss_weight = float(data.get("loss_weight", 1.0))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: repeats must be a whole number and loss_weight a number "
                         f"(got {data.get('repeats')!r}, {data.get('loss_weight')!r})") from None
    return Concept(instance_dir=str(data["instance_dir"]) if data.get("instance_dir") else None,
                   token=str(data["token"]).strip(), class_noun=str(data.get("class_noun") or "").strip(),
                   repeats=repeats, loss_weight=loss_weight,
                   class_dir=str(data["class_dir"]) if data.get("class_dir") else None,
                   images=int(data.get("images") or 0))


def _whole(value: Any) -> int:
    """A whole number (2, 2.0, "2"); 1.5 is refused rather than cut."""
    number = float(value)
    if number != int(number):
        raise ValueError(value)
    return int(number)


def read_concepts_file(path: str | Path) -> List[Concept]:
    """A JSON (or TOML: `[[concepts]]` tables) file of concepts; relative folders are read from the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--concepts {path}: no such file; give a JSON list of concepts "
                         f"(objects with {', '.join(CONCEPT_KEYS)})")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--concepts {path}: cannot parse ({exc})") from exc
    return parse_concepts(data, source=f"--concepts {path}", base_dir=p.parent.resolve())


def check_concepts(concepts: Sequence[Concept], prior: bool) -> None:
    """What a run of these concepts refuses before any work: repeats below 1, a loss weight that is not
    positive, a missing class noun under prior preservation, and identifiers that clash (tokens.py)."""
    for i, c in enumerate(concepts):
        name = f"concept {i + 1} ('{c.phrase}')"
        if c.repeats < 1:
            raise ValueError(f"{name}: repeats must be at least 1 (it is {c.repeats})")
        if not (math.isfinite(c.loss_weight) and c.loss_weight > 0):
            raise ValueError(f"{name}: loss_weight must be a positive number (it is {c.loss_weight})")
        if prior and not c.class_noun:
            raise ValueError(f"{name}: prior preservation needs its class noun (e.g. 'dog'), or turn prior off")
    if len(concepts) > 1:
        require_distinct_identifiers([(c.token, c.class_noun) for c in concepts])


def combine(parts: Sequence[Tuple[Concept, PreparedDataset, str]]) -> PreparedDataset:
    """One training set of several subjects: (concept, its prepared photos, its class prompt) each. Every
    image carries its concept's repeats, loss weight and class prompt. The sets must share resolution
    and flip: a run trains at one resolution and mirrors all its images or none."""
    if not parts:
        raise DatasetError("concepts: none given; give at least one subject's photos")
    first = parts[0][1]
    for concept, data, _ in parts[1:]:
        for name in ("resolution", "flip"):
            if getattr(data, name) != getattr(first, name):
                raise DatasetError(f"concept '{concept.phrase}': its {name} is {getattr(data, name)}, but "
                                   f"'{parts[0][0].phrase}' has {getattr(first, name)}; one run trains all "
                                   f"subjects with the same {name}")
    items = [replace(item, repeats=c.repeats, loss_weight=c.loss_weight, class_prompt=prompt)
             for c, data, prompt in parts for item in data.items]
    crops = {data.crop for _, data, _ in parts}
    return PreparedDataset(items, [r for _, data, _ in parts for r in data.report], flip=first.flip,
                           resolution=first.resolution, crop=crops.pop() if len(crops) == 1 else "bucket")
