"""nvidia-smi's view of GPU memory while each child runs (what the card really has in use: the
CUDA context, the caching allocator's reserve and library workspaces on top of the tensors that
torch.cuda.max_memory_allocated counts).

A background thread asks `nvidia-smi --query-gpu=memory.used` every `interval` seconds and stamps
each answer with this process's clock, so a child's peak is the highest sample inside its
[start, end] window; the children run one at a time, so the card's memory in that window is the
child's. Samples are also written as CSV (seconds since start, MiB) for the logs."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

QUERY = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]


def parse_mib(text: str) -> Optional[float]:
    """The first GPU's memory.used (MiB) from nvidia-smi's csv,noheader,nounits answer."""
    for line in text.strip().splitlines():
        try:
            return float(line.strip().split(",")[0])
        except ValueError:
            continue
    return None


class SmiPoller:
    """Samples GPU memory in a thread; `peak_between(t0, t1)` is the highest MiB seen in a window."""

    def __init__(self, interval: float = 0.2, query: Sequence[str] = QUERY,
                 read: Optional[Callable[[], Optional[float]]] = None):
        self.interval = interval
        self.query = list(query)
        self.read = read or self._read
        self.samples: List[Tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None

    @staticmethod
    def available() -> bool:
        return shutil.which(QUERY[0]) is not None

    def _read(self) -> Optional[float]:
        try:
            out = subprocess.run(self.query, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.error = str(exc)
            return None
        return parse_mib(out.stdout) if out.returncode == 0 else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            mib = self.read()
            if mib is not None:
                self.samples.append((time.time(), mib))
            self._stop.wait(self.interval)

    def start(self) -> "SmiPoller":
        self._thread = threading.Thread(target=self._loop, name="nvidia-smi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def peak_between(self, t0: float, t1: float) -> Optional[float]:
        inside = [mib for t, mib in list(self.samples) if t0 <= t <= t1]
        return max(inside) if inside else None

    def baseline(self) -> Optional[float]:
        """The first sample: memory in use before any child ran (other processes, a display)."""
        return self.samples[0][1] if self.samples else None

    def write_csv(self, path: Path, t0: float) -> None:
        lines = ["seconds,memory_used_mib"] + [f"{t - t0:.2f},{mib:.0f}" for t, mib in self.samples]
        Path(path).write_text("\n".join(lines) + "\n")
