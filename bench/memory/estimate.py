"""The prediction: the trainer's step over fake tensors, counted by `tracker.StorageTracker`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List

from . import architectures, fake, step
from .settings import Setting
from .tracker import StorageTracker


@dataclass
class Breakdown:
    """Bytes at the step's peak, split as the table shows them."""

    weights: int
    lora_optim: int
    activations: int
    notes: List[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.weights + self.lora_optim + self.activations

    def to_dict(self) -> Dict[str, object]:
        return {**asdict(self), "peak": self.peak}


def from_tracker(tracker: StorageTracker) -> Breakdown:
    parts = tracker.at_peak
    return Breakdown(parts["weights"], parts["lora"] + parts["optim"], parts["act"])


def predict(spec: architectures.Spec, setting: Setting, *, cuda_norms: bool = True, steps: int = 2) -> Breakdown:
    """Peak of `steps` steps of `setting` on `spec` at full size, no memory used. `cuda_norms`: norms in
    fp32 under autocast, as on a GPU (off to compare with a CPU run)."""
    mode = fake.fake_mode()
    prepared = step.prepare(spec, setting, mode=mode)
    tracker = StorageTracker()
    with mode, fake.cuda_autocast_norms(cuda_norms and setting.autocast, prepared.step_modules):
        step.tracked_steps(prepared, tracker, steps=steps)
    result = from_tracker(tracker)
    if setting.optimizer == "adamw8bit" and not step.bitsandbytes_present():
        # The step ran with AdamW; its state is swapped for AdamW8bit's layout (bitsandbytes is absent here).
        adamw, eight = step.state_bytes(prepared.optimizer), step.adamw8bit_state_bytes(prepared.params)
        result.lora_optim += eight - adamw
        result.notes.append("state from bitsandbytes' layout; not installed here")
    return result
