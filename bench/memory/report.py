"""The tables: estimates per family and setting against the issue's targets, and the self-check."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .estimate import Breakdown
from .selfcheck import TOLERANCE, Check
from .settings import Setting

GIB = 2 ** 30


@dataclass
class Row:
    family: str
    resolution: int
    setting: Setting
    estimate: Breakdown
    target_gib: Optional[float]

    @property
    def passes(self) -> Optional[bool]:
        return None if self.target_gib is None else self.estimate.peak / GIB <= self.target_gib

    def to_dict(self) -> dict:
        return {"family": self.family, "resolution": self.resolution, "setting": self.setting.key,
                "label": self.setting.label, "option": self.setting.option, **self.estimate.to_dict(),
                "target_gib": self.target_gib, "passes": self.passes}


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def estimate_table(rows: List[Row]) -> str:
    lines = ["| model | setting | weights | LoRA + optimizer | activations | **peak** GiB | target | how |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        e = r.estimate
        verdict = "" if r.passes is None else f"≤ {r.target_gib:g}: {'pass' if r.passes else 'FAIL'}"
        notes = f" ({'; '.join(e.notes)})" if e.notes else ""
        lines.append(f"| {r.family} {r.resolution} px | {r.setting.label} | {_gib(e.weights)} | {_gib(e.lora_optim)} | "
                     f"{_gib(e.activations)} | **{_gib(e.peak)}** | {verdict} | {r.setting.option}{notes} |")
    return "\n".join(lines)


def selfcheck_table(checks: List[Check]) -> str:
    lines = ["| reduced model | setting | predicted MiB | measured MiB | measured/predicted | within "
             f"{TOLERANCE:.0%} |", "|---|---|---:|---:|---:|---|"]
    for c in checks:
        lines.append(f"| {c.model} | {c.setting} | {c.predicted / 2**20:.2f} | {c.measured / 2**20:.2f} | "
                     f"{c.ratio:.3f} | {'yes' if c.ok else 'NO'} |")
    return "\n".join(lines)
