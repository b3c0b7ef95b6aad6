"""`python -m bench memory [--quick] [--json OUT]`: the estimate table, then the self-check (exit 1
when a self-check ratio falls outside the tolerance; the targets are reported, not enforced)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import List, Optional

from . import architectures, estimate, selfcheck
from .report import Row, estimate_table, selfcheck_table
from .settings import TARGETS_GIB, settings_for

FAMILIES = ("sd15", "sdxl", "flux")


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="SD1.5 only and a shorter self-check (~1 min)")
    ap.add_argument("--families", default=None,
                    help=f"comma-separated subset of {','.join(FAMILIES)} (default: all; --quick: sd15)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    ap.add_argument("--no-selfcheck", action="store_true", help="only the estimate table")
    args = ap.parse_args(argv)
    families = args.families.split(",") if args.families else (["sd15"] if args.quick else list(FAMILIES))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    args.families = families
    return args


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its per-cast warning about fp32 modules (none here)
    started = time.time()
    specs = architectures.real_specs()
    rows: List[Row] = []
    for key in args.families:
        spec = specs[key]
        for setting in settings_for(spec.kind):
            print(f"estimating {spec.label} {spec.resolution} px: {setting.label} ...", flush=True)
            rows.append(Row(spec.label, spec.resolution, setting, estimate.predict(spec, setting), TARGETS_GIB.get(key)))
    print("\nPredicted peak GPU memory of one LoRA step (rank 4, kohya's transformer set, batch 1 instance + 1 "
          "class image unless noted), tensors only (CUDA context and allocator slack come on top):\n")
    print(estimate_table(rows))
    checks = [] if args.no_selfcheck else selfcheck.run_checks(args.quick, log=lambda s: print(s, flush=True))
    if checks:
        print("\nSelf-check: the same step, measured on CPU (allocator events) vs predicted (fake tensors):\n")
        print(selfcheck_table(checks))
    ok = all(c.ok for c in checks)
    elapsed = time.time() - started
    print(f"\n{len(rows)} estimates, {len(checks)} self-checks ({'all' if ok else 'NOT all'} within "
          f"{selfcheck.TOLERANCE:.0%}), {elapsed:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "machine": platform.platform(), "processor": platform.processor(), "seconds": elapsed,
            "estimates": [r.to_dict() for r in rows],
            "selfcheck": [{"model": c.model, "setting": c.setting, "predicted": c.predicted, "measured": c.measured,
                           "ratio": c.ratio, "ok": c.ok} for c in checks]}, indent=1))
    return 0 if ok else 1
