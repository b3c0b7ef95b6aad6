"""Runs the plan on one CUDA GPU inside a time budget, through bench/run.py's machinery.

Each row is one child process under bench.child (bench.proc.run_child), exactly as `python -m bench`
runs its trainers: the reference script unmodified, our CLI, or bench.gpu_flux for the Flux-class
step. `GpuBench` subclasses bench.run.Bench only to (a) skip class-image sampling (toy-world renders
fill the class folder), (b) give every child and helper what is left of the budget as its timeout,
(c) add our GPU flags. A row that cannot start in the time left is skipped and says so."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

from bench import run as bench_run
from bench.proc import REPO, ChildFailed, ChildResult, base_env, default_python, run_child

from . import predict
from .cards import datasheet_bf16_tflops
from .plan import CLASS_IMAGES, OURS_GPU_FLAGS, GpuRow
from .smi import SmiPoller
from .table import format_table, make_result, speedups

# Seconds a row needs at least to be worth starting (model loading and caching dominate).
MIN_START_S = {"sd15": 40, "flux": 45, "sdxl": 90}
PEAK_SIZES = "2048,4096,8192"


def reference_dir() -> Optional[Path]:
    """The diffusers reference scripts: $DREAMBOOTH_REFERENCE_DIR, ../shared/… beside the checkout,
    or shared/… inside it (what the device tool carries)."""
    cands = [os.environ.get("DREAMBOOTH_REFERENCE_DIR"), REPO.parent / "shared/reference/diffusers-dreambooth",
             REPO / "shared/reference/diffusers-dreambooth"]
    return next((Path(c) for c in cands if c and (Path(c) / "train_dreambooth_lora.py").is_file()), None)


def gpu_plan(threads: int) -> "bench_run.Plan":
    """bench.run's Plan with only what the trainers' arguments read (lr, rank, precision, threads)."""
    return bench_run.Plan("cuda", threads, [], "sd15", [], [], 0, 0, 0, 0, 0, 0, mixed_precision="bf16")


class GpuBench(bench_run.Bench):
    def __init__(self, out: Path, python: str, threads: int, deadline: float, smoke: bool = False):
        # Not Bench.__init__: nothing is written until run() (a dry run only formats commands).
        self.args = SimpleNamespace(output=str(out), python=python, repeat=1, only_comfy=False)
        self.plan = gpu_plan(threads)
        self.out, self.python = Path(out).resolve(), python
        self.work, self.logs = self.out / "work", self.out / "logs"
        self.rows, self.comfy, self.peaks, self.notes = [], [], {}, []
        self.env = base_env(threads)
        self.env["HF_HOME"] = str(self.work / "hf_home_empty")
        self.deadline, self.smoke = deadline, smoke
        self.t0 = time.time()

    def remaining(self) -> float:
        return self.deadline - time.time()

    def child(self, name, wrapper, target, steps=None, trace_unet=False, python=None, env=None) -> ChildResult:
        self.log(f"run {name} ({self.remaining():.0f} s left)")
        r = run_child(name, python or self.python, wrapper, target, workdir=self.logs, env=env or self.env,
                      threads=self.plan.threads, steps=steps, trace_unet=trace_unet,
                      timeout_s=max(5.0, self.remaining()))
        self.log(f"  done in {r.wall_s:.0f} s")
        return r

    def helper(self, *args: str, python: Optional[str] = None) -> dict:
        try:
            proc = subprocess.run([python or self.python, "-m", "bench.prepare", *args], cwd=str(REPO), env=self.env,
                                  capture_output=True, text=True, timeout=max(5.0, self.remaining()))
        except subprocess.TimeoutExpired as exc:
            raise ChildFailed(f"bench.prepare {' '.join(args)}: out of time") from exc
        if proc.returncode != 0:
            raise ChildFailed(f"bench.prepare {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def class_images(self, run, model, label, res) -> Path:
        """Toy-world renders as the class folder: sampling them is skipped (a step's cost does not
        depend on what they show); the reference finds enough and generates none."""
        return Path(self.helper("instances", str(self.work / "class_renders"), str(res), str(CLASS_IMAGES))["path"])

    def ours_args(self, *a, **k) -> List[str]:
        return super().ours_args(*a, **k) + OURS_GPU_FLAGS

    # -- commands ------------------------------------------------------------------------------------
    def row_command(self, row: GpuRow, model: Path, inst: Path, cls: Path, ref_dir: Optional[Path]) -> tuple:
        """(bench.child wrapper args, target args) of a row: one step more than W+N, counted for FLOPs."""
        n, out = row.steps + 1, self.work / row.key
        flops = self.flops_flags(row.steps)
        if row.runner == "reference":
            script = (ref_dir or Path("<reference dir>")) / row.script
            return (["--script", str(script), *flops],
                    self.reference_args(model, inst, cls, CLASS_IMAGES, row.resolution, n, out, "bf16"))
        if row.runner == "ours":
            return (["--module", "dreambooth_core", *flops],
                    self.ours_args(model, inst, cls, CLASS_IMAGES, row.resolution, n, out, mixed_precision="bf16"))
        if self.smoke:  # the reduced layout on the CPU: checks this runner where no GPU is
            return (["--module", "bench.gpu_flux", *flops], ["--base", row.precision, "--steps", str(n), "--tiny",
                                                             "--resolution", str(row.resolution), "--device", "cpu"])
        return (["--module", "bench.gpu_flux", *flops],
                ["--base", row.precision, "--steps", str(n), "--resolution", str(row.resolution), "--device", "cuda"])

    def full_command(self, row: GpuRow, *paths) -> List[str]:
        wrapper, target = self.row_command(row, *paths)
        return [self.python, "-m", "bench.child", "--record", str(self.logs / f"{row.key}.record.json"),
                "--threads", str(self.plan.threads), "--steps", str(row.steps), *wrapper, "--", *target]


class GpuRun:
    """The whole run: environment probe, nvidia-smi, bf16 peak, the rows, predictions, outputs."""

    def __init__(self, rows: List[GpuRow], out: Path, python: str, budget_s: float, copy_to: Optional[Path],
                 smoke: bool = False):
        # smoke: the reduced layout at 64 px on the CPU; full-size predictions do not apply to it
        self.rows = [dataclasses.replace(r, resolution=64, prediction="") for r in rows] if smoke else rows
        self.copy_to, self.smoke = copy_to, smoke
        self.t0 = time.time()
        threads = 1 if smoke else min(8, os.cpu_count() or 1)
        self.bench = GpuBench(out, python, threads, self.t0 + budget_s, smoke)
        self.device = "cpu" if smoke else "cuda"
        self.out = self.bench.out
        self.results: List[Dict] = []
        self.notes: List[str] = []
        self.models: Dict[str, tuple] = {}  # model -> (folder, instances, classes)

    def log(self, msg: str) -> None:
        self.bench.log(msg)

    def probe(self) -> dict:
        code = ("import json, torch, diffusers; d = torch.cuda.is_available(); print(json.dumps({'torch': "
                "torch.__version__, 'diffusers': diffusers.__version__, 'cuda': d, 'name': "
                "torch.cuda.get_device_name() if d else None, 'capability': torch.cuda.get_device_capability() "
                "if d else None, 'total_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) "
                "if d else None}))")
        p = subprocess.run([self.bench.python, "-c", code], cwd=str(REPO), env=self.bench.env, capture_output=True,
                           text=True)
        if p.returncode != 0:
            raise SystemExit(f"{self.bench.python} cannot import torch and diffusers:\n{p.stderr[-2000:]}")
        info = json.loads(p.stdout.strip().splitlines()[-1])
        if not info["cuda"] and not self.smoke:
            raise SystemExit(f"{self.bench.python}: torch {info['torch']} sees no CUDA GPU")
        return info

    def measured_peak(self) -> Optional[float]:
        sizes = "256,512" if self.smoke else PEAK_SIZES
        p = subprocess.run([self.bench.python, "-m", "bench.peak", "--device", self.device, "--dtype", "bf16",
                            "--seconds", "0.5", "--sizes", sizes, "--threads", str(self.bench.plan.threads)],
                           cwd=str(REPO), env=self.bench.env, capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            self.notes.append(f"bench.peak failed: {p.stderr[-300:]}")
            return None
        return json.loads(p.stdout.strip().splitlines()[-1])["gflops"] / 1000

    def start_predictions(self) -> tuple:
        """The stored predictions; missing or stale ones recomputed in a background CPU process."""
        data = predict.load()
        fresh = data.get("fingerprint") == predict.estimator_fingerprint()
        have = set(data.get("predictions", {}) if fresh else ())
        need = sorted({r.prediction for r in self.rows if r.prediction} - have)
        proc = None
        if need:
            path = self.out / "predictions.json"
            self.log(f"estimator: computing {', '.join(need)} in the background ({'missing' if fresh else 'stale'})")
            proc = subprocess.Popen([self.bench.python, "-m", "bench.gpu.predict", "--keys", ",".join(need), "--out",
                                     str(path)], cwd=str(REPO), env=dict(self.bench.env, CUDA_VISIBLE_DEVICES=""),
                                    stdout=open(self.bench.logs / "predict.log", "w"), stderr=subprocess.STDOUT)
        return data, fresh, proc

    def prepare_model(self, model: str, res: int) -> tuple:
        if model not in self.models:
            info = self.bench.helper("model", model)
            folder = Path(info["path"])
            inst = Path(self.bench.helper("instances", str(self.bench.work), str(res), "5")["path"])
            cls = self.bench.class_images(None, folder, info["label"], res)
            self.models[model] = (folder, inst, cls)
            self.log(f"model {model}: {folder}")
        return self.models[model]

    def run_row(self, row: GpuRow, ref_dir: Optional[Path]) -> dict:
        if row.runner == "reference" and ref_dir is None:
            return {"status": "skipped", "error": "reference script not found (DREAMBOOTH_REFERENCE_DIR)"}
        if self.bench.remaining() < MIN_START_S[row.model]:
            return {"status": "skipped", "error": f"time budget: {self.bench.remaining():.0f} s left"}
        try:
            paths = (Path("-"),) * 3 if row.runner == "flux" else self.prepare_model(row.model, row.resolution)
            wrapper, target = self.bench.row_command(row, *paths, ref_dir)
            r = self.bench.child(row.key, wrapper, target, steps=row.steps)
        except ChildFailed as exc:
            timed_out = self.bench.remaining() <= 5
            return {"status": "failed", "error": ("out of time: " if timed_out else "") + str(exc)[:3000]}
        return {"status": "ok", "summary": r.summary(row.warmup), "record": r.record, "window": (r.start,
                                                                                            r.start + r.wall_s)}

    def run(self) -> int:
        b = self.bench
        b.out.mkdir(parents=True, exist_ok=True)
        (b.out / ".gitignore").write_text("# written by python -m bench.gpu\n*\n")
        b.work.mkdir(exist_ok=True)
        b.logs.mkdir(exist_ok=True)
        (b.work / "hf_home_empty").mkdir(exist_ok=True)
        smi = SmiPoller().start() if SmiPoller.available() else None
        if smi is None:
            self.notes.append("nvidia-smi not found: no nvidia-smi column")
        info = self.probe()
        card, datasheet = datasheet_bf16_tflops(info["name"] or "")
        self.log(f"{info['name']} ({info['total_gib']} GiB), torch {info['torch']}, diffusers {info['diffusers']}; "
                 f"datasheet bf16 dense peak {datasheet} TFLOP/s ({card or 'card not in bench/gpu/cards.py'})")
        preds, fresh, pred_proc = self.start_predictions()
        measured = self.measured_peak()
        self.log(f"measured bf16 matmul peak: {measured and round(measured, 1)} TFLOP/s")
        ref_dir = reference_dir()
        if ref_dir is None:
            self.notes.append("reference scripts not found: reference rows skipped (copy ../shared/reference into "
                              "shared/reference in the checkout, or set DREAMBOOTH_REFERENCE_DIR)")
        bench_run.REFERENCE_DIR = ref_dir or bench_run.REFERENCE_DIR
        raw = [(row, self.run_row(row, ref_dir)) for row in self.rows]
        if pred_proc is not None:
            try:
                pred_proc.wait(timeout=max(10.0, b.remaining()))
                extra = predict.load(b.out / "predictions.json")
                preds = {**preds, "predictions": {**preds.get("predictions", {}), **extra.get("predictions", {})}}
            except subprocess.TimeoutExpired:
                pred_proc.kill()
                self.notes.append("estimator: background predictions did not finish in time")
        if smi is not None:
            smi.stop()
        for row, r in raw:
            window = r.get("window")
            self.results.append(make_result(
                row, summary=r.get("summary"), record=r.get("record"),
                smi_peak_mib=smi.peak_between(*window) if smi and window else None, measured_tflops=measured,
                datasheet_tflops=datasheet, prediction=preds.get("predictions", {}).get(row.prediction),
                prediction_stale=not fresh and row.prediction in preds.get("predictions", {}),
                status=r["status"], error=r.get("error")))
        return self.report(info, card, datasheet, measured, smi)

    def report(self, info: dict, card, datasheet, measured, smi) -> int:
        b = self.bench
        results = {"card": {"name": info["name"], "total_gib": info["total_gib"], "capability": info["capability"],
                            "datasheet_card": card, "datasheet_bf16_tflops": datasheet,
                            "measured_bf16_tflops": measured and round(measured, 1), "peak_sizes": PEAK_SIZES},
                   "versions": {"torch": info["torch"], "diffusers": info["diffusers"], "python": b.python},
                   "machine": bench_run.machine(), "rows": self.results, "notes": self.notes,
                   "smi": {"available": smi is not None, "baseline_mib": smi.baseline() if smi else None,
                           "samples": len(smi.samples) if smi else 0},
                   "seconds": round(time.time() - self.t0, 1)}
        results["speedups"] = speedups(self.results)
        (b.out / "results.json").write_text(json.dumps(results, indent=1))
        table = format_table(results)
        (b.out / "table.md").write_text(table + "\n")
        if smi is not None:
            smi.write_csv(b.out / "smi.csv", self.t0)
        print("\n" + table + "\n")
        for line in results["speedups"] + [f"note: {n}" for n in self.notes]:
            print(line)
        for r in self.results:
            if r["status"] != "ok":
                print(f"{r['status'].upper()} {r['key']}: {(r['error'] or '').splitlines()[0][:300]}")
        print(f"results: {b.out / 'results.json'}; table: {b.out / 'table.md'}; logs: {b.logs}")
        if self.copy_to:
            self.copy_outputs(self.copy_to)
        return 0 if all(r["status"] == "ok" for r in self.results) else 1

    def copy_outputs(self, dest: Path) -> None:
        """results.json, table.md, smi.csv and logs.tar.gz into dest (the device tool's $OUT: few
        files, at most two folders deep)."""
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "table.md", "smi.csv"):
            if (self.out / name).is_file():
                shutil.copy2(self.out / name, dest / name)
        with tarfile.open(dest / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(self.bench.logs.glob("*")):
                if p.suffix in (".log", ".json") and p.stat().st_size < 8 * 2**20:
                    tar.add(p, arcname=f"logs/{p.name}")
        print(f"copied results.json, table.md, smi.csv, logs.tar.gz to {dest}")


def default_gpu_python() -> str:
    return os.environ.get("BENCH_PYTHON") or default_python() or sys.executable
