"""The machine's measured matmul peak, for the share-of-peak column (FLOPs per step / s per step /
peak; on a GPU that share is the MFU).

    python -m bench.peak [--threads N] [--dtype fp32|bf16] [--seconds 2] [--sizes 4096,8192]

Square matmuls of a few sizes, each repeated for about --seconds; the best rate is the peak. Run
by the orchestrator with each trainer's own Python and thread count, in the same run as the rows
it divides, so the peak and the steps share one torch build, one thread setting and one machine
state. Prints one JSON line: {"dtype", "threads", "device", "gflops", "by_size"}.
"""
from __future__ import annotations

import argparse
import json
import time

SIZES = (512, 1024, 2048)


def matmul_gflops(n: int, dtype, device: str, seconds: float) -> float:
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up: kernel selection, first touch of the output
    sync()
    best, spent = 0.0, 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        reps = max(1, int(2e9 / (2 * n ** 3)))  # ~2 GFLOP per timing, so the timer's resolution does not matter
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2 * n ** 3 * reps / dt / 1e9)
    return best


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m bench.peak")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seconds", type=float, default=2.0, help="per size")
    p.add_argument("--sizes", default=None, help="comma-separated square sizes (default 512,1024,2048; a big GPU "
                   "needs 4096-8192 to reach its peak)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    sizes = tuple(int(n) for n in a.sizes.split(",")) if a.sizes else SIZES
    by_size = {n: round(matmul_gflops(n, dtype, a.device, a.seconds), 2) for n in sizes}
    print(json.dumps({"dtype": a.dtype, "threads": torch.get_num_threads(), "device": a.device,
                      "gflops": max(by_size.values()), "by_size": by_size, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
