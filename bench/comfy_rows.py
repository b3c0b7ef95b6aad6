"""The ComfyUI section of `python -m bench`: our Train node against the host's own TrainLoraNode,
on each ComfyUI version present, each model, matched settings by default, plus the host's levers.

Stdlib only (the orchestrator never imports torch): every run is a bench.comfy_child process under
that host's own Python, wrapped by bench.child, which also counts one extra step's FLOPs; the
matmul peak (bench.peak) is measured with the same Python and thread count in the same run.

A case is one comparison: the host's trainer with some inputs against ours with the equivalent
ones (or none: "no equivalent"). In a matched case both adapt the same modules at the same rank,
dtype, batch (1), optimizer (AdamW) and checkpointing, and the trainable-parameter counts, printed
beside each row, must be equal (the bench stops otherwise).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from bench.proc import REPO


@dataclass
class ComfyHost:
    version: str  # "0.3.64" | "0.33"
    dir: Path
    python: Path

    def missing(self) -> Optional[str]:
        if not (self.dir / "main.py").is_file():
            return f"no ComfyUI in {self.dir}"
        if not self.python.is_file():
            return f"{self.python} missing (COMFYUI_DIR={self.dir} COMFYUI_VENV=... bash tools/setup_comfyui_env.sh)"
        return None


def default_hosts(python_0364: Optional[str] = None, python_033: Optional[str] = None) -> List[ComfyHost]:
    """The two supported versions, where tools/test.sh finds them (same variables)."""
    shared = REPO.parent / "shared"
    return [ComfyHost("0.3.64", Path(os.environ.get("COMFYUI_DIR", shared / "comfyui")),
                      Path(python_0364 or REPO / ".venv-comfyui" / "bin" / "python")),
            ComfyHost("0.33", Path(os.environ.get("COMFYUI_CURRENT_DIR", shared / "comfyui-0.33")),
                      Path(python_033 or REPO / ".venv-comfyui-current" / "bin" / "python"))]


@dataclass
class Case:
    """One comparison. `host`/`ours` are bench.comfy_child flags; `ours=None`: no equivalent."""
    name: str
    host: List[str]
    ours: Optional[List[str]]
    matched: bool
    versions: Tuple[str, ...] = ("0.3.64", "0.33")
    dtype: str = "fp32"
    note: str = ""


def cases(model: str, quick: bool) -> List[Case]:
    """The matched case first, then (unless `quick`: matched only) the host's levers, each against ours."""
    # Our flow path always recomputes each transformer block (nodes/flow_path.py); the host's
    # depth-1 checkpointing recomputes the same top-level blocks. The UNet runs without on both.
    gc = ["--checkpointing"] if model.startswith("sd3") else []
    out = [Case("matched", ["--lora-set", "matched", *gc], [*gc], True)]
    if quick:
        return out
    out.append(Case("host's LoRA set as shipped (every Linear/Conv + bias/norm differences) vs our default",
                    ["--lora-set", "shipped", *gc], [*gc], False))
    if model == "sd15":
        out.append(Case("gradient checkpointing (host depth 1)", ["--lora-set", "matched", "--checkpointing"],
                        ["--checkpointing"], True))
        out.append(Case("gradient checkpointing (host depth 2)", ["--lora-set", "matched", "--checkpointing",
                                                                  "--depth", "2"], ["--checkpointing"], True,
                        versions=("0.33",)))
    out.append(Case("bf16 training dtype", ["--lora-set", "matched", "--dtype", "bf16", *gc], ["--dtype", "bf16", *gc],
                    True, dtype="bf16"))
    out.append(Case("fp8 base (float8_e4m3fn weights), bf16 compute",
                    ["--lora-set", "matched", "--base", "fp8", "--dtype", "bf16", *gc],
                    ["--base", "fp8", "--dtype", "bf16", *gc], True, dtype="bf16"))
    out.append(Case("host offloading", ["--lora-set", "matched", "--offloading", *gc], None, False,
                    versions=("0.33",), note="CPU: nothing to offload to; ours has no equivalent"))
    out.append(Case("host bypass mode", ["--lora-set", "matched", "--bypass", *gc], None, False,
                    versions=("0.33",), note="ours has no equivalent (for fp8 or offloaded base weights)"))
    return out


@dataclass
class Measured:
    host: str
    model: str
    case: str
    who: str  # "host" | "ours"
    matched: bool
    s_per_step: Optional[float]
    peak_rss_mib: float
    training_peak_rss_mib: Optional[float]
    trainable_params: int
    flops_per_step: Optional[float]
    peak_gflops: Optional[float]
    note: str = ""
    detail: Dict = field(default_factory=dict)
    pair: int = 1  # with repeat > 1: which back-to-back (host, ours) pair the row belongs to
    after_load_peak_rss_mib: Optional[float] = None  # the trainer's own peak: from the end of the model load

    @property
    def share_of_peak(self) -> Optional[float]:
        if not (self.flops_per_step and self.s_per_step and self.peak_gflops):
            return None
        return self.flops_per_step / self.s_per_step / (self.peak_gflops * 1e9)


def measure_peak(host: ComfyHost, env: dict, threads: int, dtype: str, seconds: float) -> dict:
    proc = subprocess.run([str(host.python), "-m", "bench.peak", "--threads", str(threads), "--dtype", dtype,
                           "--seconds", str(seconds)], cwd=str(REPO), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.peak under {host.python} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_comfy_section(*, hosts: List[ComfyHost], models: List[str], quick: bool, warmup: int, measure: int,
                      resolution: int, rank: int, lr: float, images: int, threads: int, env: dict, work: Path,
                      child: Callable, log: Callable, notes: List[str], profile: bool = False,
                      matched_only: bool = False, repeat: int = 1) -> List[Measured]:
    """Run every case on every host present; `child(name, wrapper, target, steps, python, env)` is the
    orchestrator's measured launcher (bench.run.Bench.child). With `repeat` N, each case runs as N
    back-to-back pairs, (host, ours) and (ours, host) in turn (run_order): a machine whose speed drifts
    over minutes slows both members of a pair alike, and `ratios` takes the median of the pairs' ratios.
    With `profile`, the matched case runs once more per trainer with bench.phases' hooks (not timed
    rows: their phase split goes into the first pair's timed row's detail)."""
    out: List[Measured] = []
    steps = warmup + measure

    def trainer_args(tag: str, model: str, who: str, flags: List[str], n_steps: int) -> List[str]:
        return ["--which", who, "--model", model, "--work", str(work / tag), "--resolution", str(resolution),
                "--steps", str(n_steps), "--rank", str(rank), "--lr", str(lr), "--images", str(images), *flags]

    def run_one(host: ComfyHost, henv: dict, model: str, case: Case, who: str, flags: List[str], pair_no: int,
                peak: dict) -> Measured:
        """One trainer's timed run (one step more, whose FLOPs are counted), and its phase split if asked."""
        tag = (f"comfy{host.version.replace('.', '')}_{model}_{_slug(case.name)}_{who}"
               + (f"_pair{pair_no}" if pair_no > 1 else ""))
        info_path = work / f"{tag}.info.json"
        r = child(tag, ["--flops-step", str(steps + 1)],
                  [*trainer_args(tag, model, who, flags, steps + 1), "--info", str(info_path)],
                  steps, str(host.python), henv)
        info = json.loads(info_path.read_text())
        s = r.summary(warmup)
        m = Measured(host.version, model, case.name, who, case.matched, s.get("s_per_step"), s["peak_rss_mib"],
                     s.get("training_peak_rss_mib"), info["trainable_params"], r.record.get("flops_per_step"),
                     peak["gflops"], case.note, {"info": info, "summary": s, "peak": peak}, pair_no,
                     s.get("after_load_peak_rss_mib"))
        if profile and case.name == "matched" and pair_no == 1:
            p = child(tag + "_phases", ["--phases"], trainer_args(tag + "_phases", model, who, flags, steps),
                      steps, str(host.python), henv)
            m.detail["phases"] = phase_means(p.record.get("phases", []), warmup)
        return m

    for host in hosts:
        why = host.missing()
        if why:
            notes.append(f"ComfyUI {host.version}: skipped ({why})")
            continue
        henv = dict(env, COMFYUI_DIR=str(host.dir))
        peaks: Dict[str, dict] = {}
        for model in models:
            for case in cases(model, quick or matched_only):
                if host.version not in case.versions:
                    continue
                if case.dtype not in peaks:
                    peaks[case.dtype] = measure_peak(host, henv, threads, case.dtype, 1.0 if quick else 2.0)
                    log(f"ComfyUI {host.version}: {case.dtype} matmul peak {peaks[case.dtype]['gflops']:.1f} GFLOP/s "
                        f"({threads} thread(s))")
                for pair_no in range(1, repeat + 1):
                    pair = [run_one(host, henv, model, case, who, flags, pair_no, peaks[case.dtype])
                            for who, flags in run_order(pair_no, [("host", case.host), ("ours", case.ours)])
                            if flags is not None]
                    pair.sort(key=lambda m: m.who != "host")
                    out += pair
                    if case.matched and len(pair) == 2 and pair[0].trainable_params != pair[1].trainable_params:
                        raise RuntimeError(f"ComfyUI {host.version} {model} '{case.name}': not matched, the host "
                                           f"trains {pair[0].trainable_params:,} parameters and ours "
                                           f"{pair[1].trainable_params:,}")
    return out


def run_order(pair_no: int, runs: list) -> list:
    """The pair's runs in the order they go: the host first in odd pairs, ours first in even ones, so
    whatever favours the first or the second run of a pair (a warm page cache, the other's leftovers)
    cancels in the median of an even number of pairs."""
    return list(runs) if pair_no % 2 else list(reversed(runs))


def phase_means(steps: List[dict], warmup: int) -> Dict[str, float]:
    """Mean seconds per phase over the steps after the warm-up (bench.phases' step records)."""
    sel = steps[warmup:] or steps
    return {k: sum(s[k] for s in sel) / len(sel) for k in sel[0]} if sel else {}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())[:40].strip("_")


def ratios(rows: List[dict]) -> Dict[Tuple[str, str, str], Tuple[Optional[float], Optional[float]]]:
    """(host version, model, case) → (speedup = host s/step / ours, memory = ours peak RSS / host's), each
    taken within its back-to-back pair; with several pairs, the median of the pairs' ratios."""
    per_pair = {}
    for key, (speed, memory) in pair_ratios(rows).items():
        per_pair.setdefault(key[:3], []).append((speed, memory))
    return {key: (statistics.median(s for s, _ in v), statistics.median(m for _, m in v))
            for key, v in per_pair.items()}


def after_load_ratios(rows: List[dict]) -> Dict[Tuple[str, str, str], float]:
    """(host version, model, case) → the median over pairs of our peak RSS after the model load / the host's:
    the trainers' own memory, without the loader's peak both share."""
    per_pair = {}
    for key, pair in by_pair(rows).items():
        h, o = pair.get("host"), pair.get("ours")
        if h and o and h.get("after_load_peak_rss_mib") and o.get("after_load_peak_rss_mib"):
            per_pair.setdefault(key[:3], []).append(o["after_load_peak_rss_mib"] / h["after_load_peak_rss_mib"])
    return {key: statistics.median(v) for key, v in per_pair.items()}


def by_pair(rows: List[dict]) -> Dict[Tuple[str, str, str, int], Dict[str, dict]]:
    """(host version, model, case, pair) → {"host": row, "ours": row} (either may be missing)."""
    by: Dict[Tuple[str, str, str, int], Dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["host"], r["model"], r["case"], r.get("pair", 1)), {})[r["who"]] = r
    return by


def pair_ratios(rows: List[dict]) -> Dict[Tuple[str, str, str, int], Tuple[float, float]]:
    """(host version, model, case, pair) → (speedup, memory) of that pair's two rows."""
    out = {}
    for key, pair in by_pair(rows).items():
        h, o = pair.get("host"), pair.get("ours")
        if h and o and h["s_per_step"] and o["s_per_step"]:
            out[key] = (h["s_per_step"] / o["s_per_step"], o["peak_rss_mib"] / h["peak_rss_mib"])
    return out
