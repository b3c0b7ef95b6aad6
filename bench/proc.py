"""Launch one measured child process and collect what it did.

Each program runs in its own process, wrapped by ``bench.child`` (see there). The parent
- waits for it with ``os.wait4``, whose ``ru_maxrss`` is the kernel's peak RSS of exactly that
  child (not of every child, as ``RUSAGE_CHILDREN`` would be);
- polls ``/proc/PID/status`` VmRSS every ``poll_s`` seconds: a memory timeline for the chart and
  a fallback for the phase peaks where the child cannot reset its high-water mark;
- writes the child's stdout+stderr to a log file (tail shown on failure).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


class ChildFailed(RuntimeError):
    pass


@dataclass
class ChildResult:
    name: str
    wall_s: float
    exit_code: int
    ru_maxrss_kib: int
    rss_samples: List[tuple]  # (seconds since start, KiB)
    record: dict
    log: Path
    start: float

    # -- derived --------------------------------------------------------------------------------
    @property
    def step_times(self) -> List[float]:
        return list(self.record.get("step_times", []))

    def steady_s_per_step(self, warmup: int) -> Optional[float]:
        """Mean seconds of steps warmup+1 .. N: (t_N − t_warmup) / (N − warmup), where t_k is the
        end of step k (the optimizer's post-step hook)."""
        t = self.step_times
        if len(t) <= warmup or warmup < 1:
            return None
        return (t[-1] - t[warmup - 1]) / (len(t) - warmup)

    def peak_rss_kib(self) -> int:
        """The child's own high-water marks (VmHWM, per phase). wait4's ru_maxrss is only a
        fallback: it also counts the parent's pages that the forked child held before exec."""
        phases = [v for v in self.record.get("rss_phases_kib", {}).values() if v]
        return max(phases) if phases else self.ru_maxrss_kib

    def training_peak_rss_kib(self) -> Optional[int]:
        """Peak RSS over training steps 2..N (after loading, caching and the first step)."""
        phases = self.record.get("rss_phases_kib", {})
        if self.record.get("hwm_reset") and phases.get("steps_2_to_n"):
            return phases["steps_2_to_n"]
        t = self.step_times
        if len(t) < 2:
            return None
        lo, hi = t[0] - self.start, t[-1] - self.start
        inside = [kib for s, kib in self.rss_samples if lo <= s <= hi]
        return max(inside) if inside else None

    def after_load_peak_rss_kib(self) -> Optional[int]:
        """Peak RSS from the end of the program's model load (bench.child.model_loaded) to its exit: the
        trainer's own, without the loader's transient peak that every trainer on that model shares."""
        phases = self.record.get("rss_phases_kib", {})
        if not (self.record.get("hwm_reset") and phases.get("load")):
            return None
        after = [v for k, v in phases.items() if k != "load" and v]
        return max(after) if after else None

    def cuda_peak_bytes(self) -> Optional[int]:
        phases = self.record.get("cuda_phases_bytes", {})
        vals = [v["max_allocated"] for v in phases.values()]
        return max(vals) if vals else None

    def cuda_training_peak_bytes(self) -> Optional[int]:
        v = self.record.get("cuda_phases_bytes", {}).get("steps_2_to_n")
        return v["max_allocated"] if v else None

    def summary(self, warmup: int = 0) -> dict:
        out = {"wall_s": round(self.wall_s, 2), "exit_code": self.exit_code,
               "peak_rss_mib": round(self.peak_rss_kib() / 1024, 1), "steps_recorded": len(self.step_times),
               "rss_phases_mib": {k: (round(v / 1024, 1) if v else None)
                                  for k, v in self.record.get("rss_phases_kib", {}).items()},
               "hwm_reset": self.record.get("hwm_reset"), "log": str(self.log)}
        tp = self.training_peak_rss_kib()
        out["training_peak_rss_mib"] = round(tp / 1024, 1) if tp else None
        al = self.after_load_peak_rss_kib()
        if al:
            out["after_load_peak_rss_mib"] = round(al / 1024, 1)
        if warmup:
            s = self.steady_s_per_step(warmup)
            out["s_per_step"] = round(s, 4) if s else None
            out["warmup_steps"] = warmup
        t = self.step_times
        if t:
            out["to_first_step_end_s"] = round(t[0] - self.start, 2)
            out["after_last_step_s"] = round(self.start + self.wall_s - t[-1], 2)
        cp, ct = self.cuda_peak_bytes(), self.cuda_training_peak_bytes()
        if cp is not None:
            out["cuda_peak_mib"] = round(cp / 2**20, 1)
            out["cuda_training_peak_mib"] = round(ct / 2**20, 1) if ct else None
        if self.record.get("unet_calls"):
            out["unet_calls"] = self.record["unet_calls"]
            out["sampling_span_s"] = round(self.record["unet_last_end"] - self.record["unet_first_start"], 2)
        return out


def _rss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def base_env(threads: int, extra: Optional[Dict[str, str]] = None, hf_home: Optional[Path] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "DIFFUSERS_VERBOSITY": "warning", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    })
    if hf_home is not None:
        hf_home.mkdir(parents=True, exist_ok=True)
        env["HF_HOME"] = str(hf_home)
    env.update(extra or {})
    return env


def run_child(name: str, python: str, wrapper_args: Sequence[str], target: Sequence[str], *, workdir: Path,
              env: Dict[str, str], threads: int, steps: Optional[int] = None, trace_unet: bool = False,
              poll_s: float = 0.05, timeout_s: Optional[float] = None, log=print) -> ChildResult:
    """Run `python -m bench.child ... -- target...` and measure it; raise ChildFailed on a non-zero exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    record_path = workdir / f"{name}.record.json"
    log_path = workdir / f"{name}.log"
    record_path.unlink(missing_ok=True)
    cmd = [python, "-m", "bench.child", "--record", str(record_path), "--threads", str(threads)]
    if steps:
        cmd += ["--steps", str(steps)]
    if trace_unet:
        cmd += ["--trace-unet"]
    cmd += list(wrapper_args) + ["--"] + list(target)
    (workdir / f"{name}.cmd.json").write_text(json.dumps(cmd, indent=1))
    samples: List[tuple] = []
    with open(log_path, "wb") as out:
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                kib = _rss_kib(proc.pid)
                if kib:
                    samples.append((round(time.time() - start, 3), kib))
                if timeout_s and time.time() - start > timeout_s:
                    proc.kill()
                    pid, status, ru = os.wait4(proc.pid, 0)
                    break
                time.sleep(poll_s)
        except BaseException:
            proc.kill()
            raise
        wall = time.time() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    result = ChildResult(name, wall, code, ru.ru_maxrss, samples, record, log_path, start)
    if code != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise ChildFailed(f"{name} exited with {code} after {wall:.0f} s; log {log_path}:\n{tail}")
    return result


def default_python() -> str:
    venv = REPO / ".venv-bench" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable
