"""Live tensor memory of a training step, by part, and its peak.

A TorchDispatchMode sees every tensor an op returns; each new storage is counted until Python frees
it (a weakref callback), so the running total is exactly the bytes of live tensor storages: what a
caching GPU allocator reports as `memory_allocated` (less its rounding), with no allocator slack,
workspace of kernels or CUDA context. It works the same over fake tensors (the prediction) and
real ones (the self-check), which is why the prediction and the measurement share it.

Parts: "weights" (the frozen base), "lora" (adapter weights and their gradients), "optim"
(optimizer state, and whatever the optimizer allocates while it steps), "act" (everything else:
cached inputs, activations, temporaries of the backward pass)."""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PARTS = ("weights", "lora", "optim", "act")


def _storage(t: torch.Tensor) -> Optional[torch.UntypedStorage]:
    if not isinstance(t, torch.Tensor) or t.is_sparse:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a functional wrapper)
        return None


class StorageTracker(TorchDispatchMode):
    """Bytes of live tensor storages, by part; `peak` and the parts at that moment (`at_peak`)."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: Dict[int, str] = {}  # id(storage) -> part
        self._sizes: Dict[int, int] = {}
        self._refs: Dict[int, weakref.ref] = {}
        self.current: Dict[str, int] = dict.fromkeys(PARTS, 0)
        self.peak = 0
        self.at_peak: Dict[str, int] = dict.fromkeys(PARTS, 0)
        self._phase = "act"

    # -- bookkeeping --------------------------------------------------------------------------
    def _freed(self, key: int, _ref=None) -> None:
        part = self._parts.pop(key, None)
        if part is not None:
            self.current[part] -= self._sizes.pop(key)
            self._refs.pop(key, None)

    def tag(self, tensors: Iterable[torch.Tensor], part: str) -> None:
        """Count these tensors' storages under `part` (moving them there if already counted)."""
        if part not in PARTS:
            raise ValueError(f"part {part!r}: expected one of {PARTS}")
        for t in tensors:
            st = _storage(t)
            if st is None:
                continue
            key = id(st)
            old = self._parts.get(key)
            if old is not None:
                if old != part:
                    size = self._sizes[key]
                    self.current[old] -= size
                    self.current[part] += size
                    self._parts[key] = part
                continue
            size = st.nbytes()
            self._parts[key], self._sizes[key] = part, size
            self._refs[key] = weakref.ref(st, lambda r, k=key: self._freed(k))
            self.current[part] += size
        self._update_peak()

    def _update_peak(self) -> None:
        total = sum(self.current.values())
        if total > self.peak:
            self.peak = total
            self.at_peak = dict(self.current)

    @contextmanager
    def phase(self, part: str) -> Iterator[None]:
        """New storages made inside count under `part` (the optimizer's step: "optim")."""
        previous, self._phase = self._phase, part
        try:
            yield
        finally:
            self._phase = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        new = [t for t in flat if isinstance(t, torch.Tensor) and (st := _storage(t)) is not None
               and id(st) not in self._parts]
        if new:
            self.tag(new, self._phase)
        return out
