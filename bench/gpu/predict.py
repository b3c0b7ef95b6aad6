"""The memory estimator's prediction for each GPU row, computed ahead and stored beside the plan.

    python -m bench.gpu.predict [--keys sd15:ours,...] [--out bench/gpu/predictions.json]

Why stored: a prediction runs the step over fake tensors on the CPU (a minute or more for SDXL and
Flux at full size), which the GPU run's 8 minutes cannot afford; it depends only on the estimator's
code and the architectures, so `bench/gpu/predictions.json` holds it with a fingerprint of
bench/memory, and the run notes a stale one (and computes missing ones in a background process).
Each setting is the estimator's model of exactly what the row runs (bench/gpu/plan.py); for the
reference rows it is our step with the reference's choices (encoders kept, no checkpointing, the
attention LoRA set): the script's own extras (a VAE encode every step, SDXL's fp32 VAE) are not
modelled. Importing this module needs no torch (the runner reads the file with the stdlib)."""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
PREDICTIONS = HERE / "predictions.json"
MEMORY = HERE.parent / "memory"


def estimator_fingerprint() -> str:
    """sha256 over bench/memory's sources: predictions made by other code are marked stale."""
    h = hashlib.sha256()
    for p in sorted(MEMORY.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def load(path: Path = PREDICTIONS) -> dict:
    """{"fingerprint", "predictions": {key: {... "peak": bytes}}}; empty when the file is missing."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {"fingerprint": None, "predictions": {}}


def settings() -> Dict[str, Tuple[str, object]]:
    """Prediction key -> (estimator family, bench.memory Setting) for every row of the plan."""
    from bench.memory.settings import Setting, flux_settings

    flux = {s.key: s for s in flux_settings()}
    out: Dict[str, Tuple[str, object]] = {}
    for fam in ("sd15", "sdxl"):
        out[f"{fam}:reference"] = (fam, Setting("reference", "bf16, encoders kept, attention LoRA set, no "
                                                "checkpointing", encoders_on_gpu=True, lora_targets="attention",
                                                option="diffusers' script's choices"))
        out[f"{fam}:ours"] = (fam, Setting("ours", "bf16, encoders off, attention LoRA set, checkpointing "
                                           "attention-hires", checkpointing="attention-hires",
                                           lora_targets="attention", option="the GPU run's ours row"))
    out["flux:bf16"] = ("flux", flux["bf16"])
    out["flux:fp8"] = ("flux", flux["fp8"])
    return out


def compute(keys: List[str]) -> Dict[str, dict]:
    from dataclasses import asdict

    from bench.memory import architectures, estimate

    specs, table = architectures.real_specs(), settings()
    out = {}
    for key in keys:
        family, setting = table[key]
        t0 = time.time()
        print(f"predicting {key} ...", flush=True)
        b = estimate.predict(specs[family], setting)
        out[key] = {"family": family, "resolution": specs[family].resolution, "setting": asdict(setting),
                    **b.to_dict(), "seconds": round(time.time() - t0, 1)}
        print(f"  {key}: {b.peak / 2**30:.2f} GiB ({time.time() - t0:.0f} s)", flush=True)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", default=None, help="comma-separated prediction keys (default: all)")
    ap.add_argument("--out", default=str(PREDICTIONS), help="JSON to write (merged into an existing one)")
    a = ap.parse_args(argv)
    import diffusers
    import torch

    keys = a.keys.split(",") if a.keys else list(settings())
    data = load(Path(a.out))
    fp = estimator_fingerprint()
    if data.get("fingerprint") != fp:
        data = {"predictions": {}}
    data["predictions"].update(compute(keys))
    data.update(fingerprint=fp, torch=torch.__version__, diffusers=diffusers.__version__,
                note="peak = torch.cuda.max_memory_allocated of the step's tensors (bench/memory); bytes")
    Path(a.out).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
