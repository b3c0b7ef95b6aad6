"""The measurement of the self-check: what the CPU allocator hands out during a real step.

PyTorch's profiler (`profile_memory=True`) records every allocation and free of c10's CPU
allocator, with its size and time, including the scratch buffers kernels allocate inside an op,
which no dispatch-level tracker sees. The step's peak is then the bytes resident when it starts
(frozen weights, LoRA, optimizer state, cached inputs: their storages, counted exactly) plus the
highest running sum of what the step allocated and has not freed. Not in it: memory that kernels
take from malloc directly (oneDNN's own buffers), the allocator's slack and page-level effects,
i.e. what RSS adds (bench/README's "Where the memory goes")."""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch

from . import step
from .settings import Setting


def _resident(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += st.nbytes()
    return total


def _allocations(tree) -> List[Tuple[int, int]]:
    out, stack = [], list(tree)
    allocation = torch._C._profiler._EventType.Allocation
    while stack:
        node = stack.pop()
        if node.tag == allocation:
            out.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return sorted(out)


def measured_peak(spec, setting: Setting, warmup: int = 1, seed: int = 0) -> int:
    """Peak bytes of one real CPU step of `setting` on `spec`, after `warmup` steps (which make the
    optimizer's state, as a run's later steps have it)."""
    from torch.profiler import ProfilerActivity, profile

    p = step.prepare(spec, setting)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(warmup):
        step.train_step(p, generator)
    resident = [t for m in p.step_modules for t in list(m.parameters()) + list(m.buffers())]
    resident += [v for s in p.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    resident += [t for lat, cond in p.inputs for t in (lat, *cond.values())]
    if p.setting.encoders_on_gpu:
        resident += [t for m in p.encoders for t in m.parameters()]
    base = _resident(resident)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step.train_step(p, generator)
    running = peak = 0
    for _, size in _allocations(prof.profiler.kineto_results.experimental_event_tree()):
        running += size
        peak = max(peak, running)
    return base + peak
