"""Where a CLI process's memory comes from on CPU: glibc's malloc tuned for training steps, and
trimmed back. Process-wide, so only our own command-line processes use it (never a host)."""
from __future__ import annotations

import sys
from typing import Callable, Optional


def tune_cpu_malloc() -> Optional[object]:
    """Keep glibc's malloc from handing large blocks back to the kernel (CLI processes on CPU).

    On CPU, oneDNN (PyTorch's mkldnn convolutions) re-lays out each convolution's weights into a
    fresh buffer on every forward and backward call; SD-sized weights (up to 118 MB) are larger
    than glibc's mmap threshold, so each buffer is a new mmap that the kernel zero-fills page by
    page and unmaps again: ~1 M page faults and 30-40% of a training step spent in the kernel for
    an SD1.5 UNet on one core. `mallopt(M_MMAP_MAX, 0)` serves them from the heap, where the
    memory is reused, and a high `M_TRIM_THRESHOLD` keeps the heap from being shrunk and regrown
    on every free. Returns the C library (for `malloc_trim`) or None where this is not glibc
    (macOS, Windows, musl): then nothing changes. Process-wide, so only our own CLI processes call
    it (never a host such as ComfyUI). Numerics are untouched: only where memory comes from."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not (libc.mallopt(-4, 0) and libc.mallopt(-1, 1 << 30)):  # M_MMAP_MAX, M_TRIM_THRESHOLD
            return None
        return libc
    except (OSError, AttributeError):
        return None


def malloc_trimmer(libc, threshold: int = 256 << 20) -> Callable[[], None]:
    """A function that gives freed memory back to the kernel (`malloc_trim(0)`) when more than
    `threshold` bytes lie free in malloc's heap. With mmap off (`tune_cpu_malloc`) the heap would
    otherwise keep the holes of the last training step or sampling call resident, which raises
    the steady peak RSS by ~1 GB for SD1.5 at 256 px. Small models (a few MB of activations) skip
    it: re-faulting the pages would cost them more than it saves."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = getattr(libc, "mallinfo2", None)  # glibc >= 2.33; older ones always trim
    if mallinfo2 is not None:
        mallinfo2.restype = MallInfo2

    def trim() -> None:
        if mallinfo2 is None or mallinfo2().fordblks > threshold:
            libc.malloc_trim(0)

    return trim


def trimming(callbacks, trim: Callable[[], None]):
    """Trim when training starts and after each optimizer step. The first trim matters for the
    peak: caching (VAE and text encoder at work) leaves ~0.8 GB free but resident in the heap
    (SD1.5, 256 px) under the first step, which then peaked up to ~300 MB above the later ones,
    by an amount that varied from run to run."""
    inner_step, inner_phase = callbacks.on_step, callbacks.on_phase

    def on_step(info) -> None:
        trim()
        if inner_step:
            inner_step(info)

    def on_phase(name: str) -> None:
        if name == "training":
            trim()
        if inner_phase:
            inner_phase(name)

    callbacks.on_step, callbacks.on_phase = on_step, on_phase
    return callbacks


def trim_after_unet_calls(backend, trim: Optional[Callable[[], None]]):
    """For `class-images`: trim after every UNet call (a forward hook; the returned handle's
    `remove()` removes it); None where there is nothing to do. With mmap off, sampling SD1.5 at
    256 px in batches of 8 is ~10% faster than with the default allocator but peaks ~0.7 GB
    higher (within a UNet call, which trimming between calls cannot reach): the trade the
    standalone command makes; `train` keeps the default allocator while it samples."""
    unet = getattr(backend, "unet", None)
    if trim is None or unet is None or not hasattr(unet, "register_forward_hook"):
        return None
    return unet.register_forward_hook(lambda module, args, output: trim())
