"""`python -m bench.gpu [--dry-run] [--quick] [--models sd15,flux,sdxl] [--budget-s S] [--output DIR]`.

The orchestrator of `bash bench/gpu.sh` (which first makes the environment and then calls this
with that environment's Python): plan, time budget, outputs. `--dry-run` prints the plan, each
row's exact child command and the stored predictions, and runs nothing (works without torch)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from . import predict
from .cards import DATASHEET_BF16_TFLOPS
from .plan import CLASS_IMAGES, GpuRow, make_plan
from .runner import PEAK_SIZES, GpuBench, GpuRun, default_gpu_python, reference_dir

GIB = 2 ** 30


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    ap.add_argument("--quick", action="store_true", help="fewer steps per row")
    ap.add_argument("--models", default=None, help="comma-separated subset of sd15,flux,sdxl")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_GPU_BUDGET_S", 420)),
                    help="seconds for the whole plan (rows that cannot start in what is left are skipped)")
    ap.add_argument("--output", default="bench_gpu", help="results.json, table.md, smi.csv, logs/, work/")
    ap.add_argument("--python", default=None, help="Python of the trainers (default $BENCH_PYTHON, .venv-bench, "
                    "this one)")
    ap.add_argument("--smoke", action="store_true", help="check this runner on a CPU: the Flux rows with the "
                    "reduced layout (bench.gpu_flux --tiny), no GPU needed")
    ap.add_argument("--copy-to", default=os.environ.get("OUT") or None,
                    help="also copy the outputs here (default $OUT, the device tool's folder)")
    return ap.parse_args(argv)


def describe(rows: List[GpuRow], bench: GpuBench) -> str:
    """The dry run: rows, what each compares, its prediction, and the exact command it would run."""
    data, fp = predict.load(), predict.estimator_fingerprint()
    stale = data.get("fingerprint") != fp
    ref = reference_dir()
    cache = Path(os.environ.get("BENCH_CACHE") or "~/.cache/dreambooth-bench")
    out = [f"python: {bench.python}; threads {bench.plan.threads}; output {bench.out}",
           f"reference scripts: {ref or 'NOT FOUND (reference rows will be skipped)'}",
           f"predictions: bench/gpu/predictions.json ({'stale: recomputed in the background' if stale else 'current'})",
           f"card peak: bench.peak --device cuda --dtype bf16 --sizes {PEAK_SIZES}; datasheet table: "
           f"{len(DATASHEET_BF16_TFLOPS)} cards (bench/gpu/cards.py)",
           "nvidia-smi --query-gpu=memory.used every 0.2 s in a thread; each row's peak inside its child's window",
           f"class images: {CLASS_IMAGES} toy-world renders per model (no sampling)", ""]
    for i, row in enumerate(rows, 1):
        pred = data.get("predictions", {}).get(row.prediction)
        pgib = f"{pred['peak'] / GIB:.2f} GiB" if pred else "missing (computed in the background)"
        out.append(f"{i}. {row.key}: {row.label} {row.resolution} px, {row.trainer}, {row.precision}, "
                   f"{row.warmup} warm-up + {row.measure} measured steps (+1 counted for FLOPs)")
        out.append(f"   runs: {row.settings}")
        out.append(f"   compares: {row.compares}")
        out.append(f"   estimator: {row.prediction} -> {pgib}; columns: it/s, peak alloc, nvidia-smi, TFLOP/step, "
                   "MFU (measured, datasheet), predicted, measured/predicted")
        model = cache / f"{row.model}-seed0-<hash>"
        inst, cls = bench.work / f"instance_{row.resolution}px_5", bench.work / "class_renders" / \
            f"instance_{row.resolution}px_{CLASS_IMAGES}"
        cmd = bench.full_command(row, model, inst, cls, ref)
        out.append("   $ " + " ".join(_quote(c) for c in cmd))
    return "\n".join(out)


def _quote(s: str) -> str:
    return f"'{s}'" if any(ch in s for ch in " <>") else s


def main(argv: Optional[List[str]] = None) -> int:
    a = parse(argv)
    rows = make_plan(a.quick, ["flux"] if a.smoke else (a.models.split(",") if a.models else None))
    python = a.python or default_gpu_python()
    if a.dry_run:
        import time

        print(describe(rows, GpuBench(Path(a.output), python, min(8, os.cpu_count() or 1), time.time())))
        return 0
    run = GpuRun(rows, Path(a.output), python, a.budget_s, Path(a.copy_to) if a.copy_to else None, a.smoke)
    return run.run()


if __name__ == "__main__":
    sys.exit(main())
