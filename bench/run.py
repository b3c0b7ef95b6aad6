"""Training speed and memory, side by side with diffusers' DreamBooth LoRA script.

    python -m bench [--quick] [--output bench_out] [--models embedded,sd15] [--device auto]
    python bench/run.py ...                       (the same)

One invocation trains each model once with the reference script (train_dreambooth_lora.py,
unmodified, offline, as a subprocess) and once with ours (`python -m dreambooth_core train`, as a
subprocess), with the same images, class images and settings, each in its own process, both from
one environment (.venv-bench, made by bench/setup_env.sh) so they share one torch build; times
class-image generation (ours vs the reference's pipeline); measures how step time and memory
scale with resolution and with the number of instance images; compares our ComfyUI node with the
host's TrainLoraNode; prints a table and, last, `speedup=X.XX memory=Y.YY`; writes results.json
and chart.png under --output. How each number is measured: bench/README.md.

This orchestrator uses only the standard library and never imports torch: every heavy step runs in
a child process (see bench/proc.py for why).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench.proc import REPO, ChildFailed, ChildResult, base_env, default_python, run_child  # noqa: E402

REFERENCE_DIR = Path(os.environ.get("DREAMBOOTH_REFERENCE_DIR",
                                    REPO.parent / "shared" / "reference" / "diffusers-dreambooth"))
TOKEN, CLASS_NOUN = "sks", "star"
INSTANCE_PROMPT, CLASS_PROMPT = f"a photo of {TOKEN} {CLASS_NOUN}", f"a photo of a {CLASS_NOUN}"
# glibc tunables equivalent to what our CLI sets with mallopt (bench/README.md, "Where the speed
# comes from"): used for the extra reference row that shows how much of the gap is the allocator.
REFERENCE_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"
# Our trainer's own settings on top of the shared ones (bench/README.md, "What is compared"):
# the reference's LoRA set (attention projections only) for parity, and gradient checkpointing of
# the highest-resolution transformer blocks only, a user-facing option that trades a little time
# for much of the activation memory. Each extra row changes one of them.
OURS_SETTINGS = ["--lora-targets", "attention", "--gradient-checkpointing", "attention-hires"]
OURS_EXTRAS = [  # (child name suffix, flags appended to OURS_SETTINGS, row label)
    ("nogc", ["--no-gradient-checkpointing"], "ours, no gradient checkpointing"),
    ("gc_attention", ["--gradient-checkpointing", "attention"], "ours --gradient-checkpointing attention"),
    ("gc_full", ["--gradient-checkpointing", "full"], "ours --gradient-checkpointing full"),
    ("kohya", ["--lora-targets", "transformer"], "ours, kohya's LoRA set (--lora-targets transformer)"),
]


# -- the plan --------------------------------------------------------------------------------------
@dataclass
class ModelRun:
    name: str  # embedded | sd15 | sdxl
    resolution: Optional[int]  # None: the model's native resolution
    warmup: int
    measure: int
    class_count: int
    class_steps: int
    class_guidance: float = 5.0
    mixed_precision: Optional[str] = None  # None: the plan's ("no": fp32 everywhere)
    extras: bool = False  # extra rows: reference with our malloc settings, OURS_EXTRAS

    @property
    def steps(self) -> int:
        return self.warmup + self.measure


@dataclass
class Plan:
    device: str
    threads: int
    models: List[ModelRun]
    scaling_model: str
    scaling_resolutions: List[int]
    scaling_images: List[int]
    scaling_image_resolution: int
    scaling_warmup: int
    scaling_measure: int
    comfy_resolution: int
    comfy_warmup: int
    comfy_measure: int
    instance_images: int = 5
    lr: float = 1e-4
    rank: int = 4
    mixed_precision: str = "no"


def make_plan(quick: bool, device: str, threads: int, models: Optional[List[str]]) -> Plan:
    if device == "cuda":
        runs = [ModelRun("embedded", None, 10, 50, 8, 20),
                ModelRun("sd15", 512, 5, 20, 8, 25, extras=True),
                # SDXL at 1024 in fp32 needs more than one 80 GB GPU for a batch of 2: bf16 for both.
                ModelRun("sdxl", 1024, 3, 10, 4, 25, mixed_precision="bf16")]
        if quick:
            runs = [ModelRun("embedded", None, 5, 20, 4, 10), ModelRun("sd15", 512, 3, 10, 4, 10, extras=True)]
        plan = Plan(device, threads, runs, "sd15", [256, 384, 512], [5, 15, 30], 512, 3, 10, 256, 3, 10)
    elif quick:
        runs = [ModelRun("embedded", None, 5, 20, 4, 10),
                ModelRun("sd15", 128, 2, 3, 2, 5, extras=True)]
        plan = Plan(device, threads, runs, "sd15", [64, 96, 128], [5, 15, 30], 64, 1, 2, 64, 2, 3)
    else:
        runs = [ModelRun("embedded", None, 10, 100, 8, 20),
                ModelRun("sd15", 256, 3, 10, 4, 10, extras=True)]
        plan = Plan(device, threads, runs, "sd15", [128, 192, 256], [5, 15, 30], 128, 2, 5, 128, 3, 10)
    if models:
        known = {r.name: r for r in runs}
        # a tiny SDXL-layout model: checks the SDXL path of both trainers where no GPU is at hand
        known["tiny-sdxl"] = ModelRun("tiny-sdxl", 64, 2, 3, 2, 5)
        missing = [m for m in models if m not in known]
        if missing:
            raise SystemExit(f"--models: {', '.join(missing)} not in this plan (choose from {', '.join(known)})")
        plan.models = [known[m] for m in models]
    return plan


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Row:
    section: str  # train | classgen | scaling | comfy
    model: str
    who: str
    resolution: int
    images: int = 0
    s_per_step: Optional[float] = None
    wall_s: Optional[float] = None
    peak_rss_mib: Optional[float] = None
    training_peak_rss_mib: Optional[float] = None
    cuda_peak_mib: Optional[float] = None
    setup_s: Optional[float] = None  # start → end of the first step (loading, caching, step 1)
    steps: int = 0
    warmup: int = 0
    note: str = ""
    detail: Dict = field(default_factory=dict)
    pair: int = 1  # with --repeat: which back-to-back (reference, ours) pair the row belongs to


class Bench:
    def __init__(self, args, plan: Plan):
        self.args, self.plan = args, plan
        self.out = Path(args.output).resolve()
        self.work = self.out / "work"
        self.logs = self.out / "logs"
        self.python = args.python or default_python()
        self.rows: List[Row] = []
        self.comfy: List[dict] = []  # the ComfyUI section (bench.comfy_rows.Measured as dicts)
        self.peaks: Dict[str, float] = {}  # dtype -> measured matmul GFLOP/s of self.python
        self.notes: List[str] = []
        self.env = base_env(plan.threads, hf_home=self.work / "hf_home_empty")
        if plan.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.t0 = time.time()

    # -- helpers -----------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[bench {time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def helper(self, *args: str, python: Optional[str] = None) -> dict:
        proc = subprocess.run([python or self.python, "-m", "bench.prepare", *args], cwd=str(REPO), env=self.env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ChildFailed(f"bench.prepare {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def child(self, name: str, wrapper: List[str], target: List[str], steps: Optional[int] = None,
              trace_unet: bool = False, python: Optional[str] = None, env: Optional[dict] = None) -> ChildResult:
        self.log(f"run {name}")
        r = run_child(name, python or self.python, wrapper, target, workdir=self.logs, env=env or self.env,
                      threads=self.plan.threads, steps=steps, trace_unet=trace_unet)
        self.log(f"  done in {r.wall_s:.0f} s, peak RSS {r.peak_rss_kib() / 1024:.0f} MiB")
        return r

    def check_environment(self) -> None:
        probe = subprocess.run([self.python, "-c", "import torch, torchvision, diffusers, peft, dreambooth_core; "
                                "import json; print(json.dumps({'torch': torch.__version__, "
                                "'torchvision': torchvision.__version__, 'diffusers': diffusers.__version__, "
                                "'cuda': torch.cuda.is_available()}))"],
                               cwd=str(REPO), env=self.env, capture_output=True, text=True)
        if probe.returncode != 0:
            raise SystemExit(f"{self.python} cannot run both trainers (it needs torch, torchvision, diffusers, peft and "
                             f"this project): run `bash bench/setup_env.sh` first, or pass --python.\n"
                             f"{probe.stderr[-1500:]}")
        self.versions = json.loads(probe.stdout.strip().splitlines()[-1])
        if not (REFERENCE_DIR / "train_dreambooth_lora.py").is_file():
            raise SystemExit(f"reference script not found in {REFERENCE_DIR} (set DREAMBOOTH_REFERENCE_DIR)")

    # -- training ----------------------------------------------------------------------------------
    def reference_args(self, model: Path, inst: Path, cls: Path, n_class: int, res: int, steps: int,
                       out: Path, mixed_precision: Optional[str] = None) -> List[str]:
        return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(inst),
                "--class_data_dir", str(cls), "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT,
                "--with_prior_preservation", "--prior_loss_weight", "1.0", "--num_class_images", str(n_class),
                "--output_dir", str(out), "--seed", "0", "--resolution", str(res), "--center_crop",
                "--train_batch_size", "1", "--max_train_steps", str(steps), "--checkpointing_steps", "100000000",
                "--learning_rate", str(self.plan.lr), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                "--rank", str(self.plan.rank), "--adam_beta1", "0.9", "--adam_beta2", "0.999",
                "--adam_weight_decay", "1e-2", "--adam_epsilon", "1e-08", "--max_grad_norm", "1.0",
                "--mixed_precision", mixed_precision or self.plan.mixed_precision, "--report_to", "all",
                "--dataloader_num_workers", "0"]

    def ours_args(self, model: Path, inst: Path, cls: Path, n_class: int, res: int, steps: int, out: Path,
                  extra: List[str] = (), mixed_precision: Optional[str] = None) -> List[str]:
        # AdamW betas (0.9, 0.999), eps 1e-8 (torch's defaults) and weight decay 1e-2 (TrainConfig's
        # default) are what our trainer uses: the same values the reference is given explicitly.
        return ["train", "--model", str(model), "--instance-dir", str(inst), "--class-dir", str(cls),
                "--num-class-images", str(n_class), "--token", TOKEN, "--class-noun", CLASS_NOUN,
                "--prior", "--prior-weight", "1.0", "--resolution", str(res), "--crop", "center", "--no-flip",
                "--steps", str(steps), "--rank", str(self.plan.rank), "--lr", str(self.plan.lr),
                "--lr-scheduler", "constant", "--lr-warmup-steps", "0", "--max-grad-norm", "1.0",
                "--batch-size", "1", "--seed", "0",
                "--mixed-precision", mixed_precision or self.plan.mixed_precision, "--save-precision", "fp32",
                "--output-dir", str(out), *OURS_SETTINGS, *extra]

    def train_row(self, r: ChildResult, section: str, model: str, who: str, res: int, warmup: int,
                  images: int, note: str = "", pair: int = 1, dtype: Optional[str] = None) -> Row:
        s = r.summary(warmup)
        if dtype and r.record.get("flops_per_step"):
            s["flops_per_step"] = r.record["flops_per_step"]
            s["peak_gflops"] = self.peak(dtype)
            if s.get("s_per_step"):
                s["share_of_peak"] = s["flops_per_step"] / s["s_per_step"] / (s["peak_gflops"] * 1e9)
        row = Row(section, model, who, res, images, s.get("s_per_step"), s["wall_s"], s["peak_rss_mib"],
                  s.get("training_peak_rss_mib"), s.get("cuda_peak_mib"), s.get("to_first_step_end_s"),
                  s["steps_recorded"], warmup, note, s, pair)
        self.rows.append(row)
        return row

    @staticmethod
    def flops_flags(measured_steps: int) -> List[str]:
        """bench.child's flags that count the FLOPs of the step after the measured ones."""
        return ["--flops-step", str(measured_steps + 1)]

    def dtype_of(self, run: "ModelRun") -> str:
        return "bf16" if (run.mixed_precision or self.plan.mixed_precision) == "bf16" else "fp32"

    def peak(self, dtype: str) -> float:
        """The matmul peak (GFLOP/s) of the trainers' Python, threads and device (bench.peak), once per dtype."""
        if dtype not in self.peaks:
            proc = subprocess.run([self.python, "-m", "bench.peak", "--threads", str(self.plan.threads), "--dtype",
                                   dtype, "--device", self.plan.device], cwd=str(REPO), env=self.env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ChildFailed(f"bench.peak failed:\n{proc.stderr[-2000:]}")
            self.peaks[dtype] = json.loads(proc.stdout.strip().splitlines()[-1])["gflops"]
            self.log(f"{dtype} matmul peak: {self.peaks[dtype]:.1f} GFLOP/s")
        return self.peaks[dtype]

    def reference_script(self, model_name: str) -> Path:
        sdxl = model_name in ("sdxl", "tiny-sdxl")
        return REFERENCE_DIR / ("train_dreambooth_lora_sdxl.py" if sdxl else "train_dreambooth_lora.py")

    def run_model(self, run: ModelRun) -> None:
        info = self.helper("model", run.name)
        model, label = Path(info["path"]), info["label"]
        self.notes += info.get("notes", [])
        res = run.resolution or info["native_resolution"]
        self.log(f"model {run.name}: {label} at {res} px ({model})")
        inst = Path(self.helper("instances", str(self.work), str(res), str(self.plan.instance_images))["path"])
        cls = self.class_images(run, model, label, res)
        n_class = run.class_count
        wd = self.work / run.name

        mp = f"mixed precision {run.mixed_precision}" if run.mixed_precision else ""
        # With --repeat N the two trainers alternate N times (reference, ours, reference, ours, ...): a
        # machine whose speed drifts over minutes then slows both members of a pair alike, and the
        # headline is the median over the pairs.
        for pair in range(1, self.args.repeat + 1):
            tag = "" if pair == 1 else f"_pair{pair}"
            # One step more than measured: the last one's FLOPs are counted (bench.child --flops-step).
            ref = self.child(f"{run.name}_reference{tag}", ["--script", str(self.reference_script(run.name)),
                                                            *self.flops_flags(run.steps)],
                             self.reference_args(model, inst, cls, n_class, res, run.steps + 1,
                                                 wd / f"reference{tag}_out", run.mixed_precision), steps=run.steps)
            self.train_row(ref, "train", label, "reference", res, run.warmup, self.plan.instance_images, note=mp,
                           pair=pair, dtype=self.dtype_of(run))
            ours = self.child(f"{run.name}_ours{tag}", ["--module", "dreambooth_core", *self.flops_flags(run.steps)],
                              self.ours_args(model, inst, cls, n_class, res, run.steps + 1, wd / f"ours{tag}_out",
                                             mixed_precision=run.mixed_precision), steps=run.steps)
            self.train_row(ours, "train", label, "ours", res, run.warmup, self.plan.instance_images, note=mp,
                           pair=pair, dtype=self.dtype_of(run))
        if run.extras and not self.args.no_extras and self.plan.device == "cpu":
            env = dict(self.env, GLIBC_TUNABLES=REFERENCE_MALLOC_TUNABLES)
            r = self.child(f"{run.name}_reference_malloc", ["--script", str(self.reference_script(run.name)),
                                                            *self.flops_flags(run.steps)],
                           self.reference_args(model, inst, cls, n_class, res, run.steps + 1,
                                               wd / "reference_malloc_out"),
                           steps=run.steps, env=env)
            self.train_row(r, "train-extra", label, "reference + our malloc settings", res, run.warmup,
                           self.plan.instance_images, note=f"GLIBC_TUNABLES={REFERENCE_MALLOC_TUNABLES}",
                           dtype=self.dtype_of(run))
        if run.extras and not self.args.no_extras:
            for suffix, flags, who in OURS_EXTRAS:
                r = self.child(f"{run.name}_ours_{suffix}", ["--module", "dreambooth_core", *self.flops_flags(run.steps)],
                               self.ours_args(model, inst, cls, n_class, res, run.steps + 1, wd / f"ours_{suffix}_out",
                                              flags, mixed_precision=run.mixed_precision), steps=run.steps)
                self.train_row(r, "train-extra", label, who, res, run.warmup, self.plan.instance_images, note=mp,
                               dtype=self.dtype_of(run))

    def class_images(self, run: ModelRun, model: Path, label: str, res: int) -> Path:
        """Generate the class images with ours (timed), time the reference's pipeline on the same
        count and steps, and return a plain folder with our images for both trainers."""
        wd = self.work / run.name
        cache = wd / "class_cache"
        shutil.rmtree(cache, ignore_errors=True)
        ours = self.child(f"{run.name}_classgen_ours", ["--module", "dreambooth_core"],
                          ["class-images", "--model", str(model), "--class-prompt", CLASS_PROMPT,
                           "--count", str(run.class_count), "--steps", str(run.class_steps),
                           "--guidance", str(run.class_guidance), "--resolution", str(res), "--class-dir", str(cache),
                           "--seed", "0"], trace_unet=True)
        ref = self.child(f"{run.name}_classgen_reference", ["--module", "bench.ref_classgen"],
                         ["--model", str(model), "--prompt", CLASS_PROMPT, "--count", str(run.class_count),
                          "--steps", str(run.class_steps), "--guidance", str(run.class_guidance),
                          "--resolution", str(res), "--out", str(wd / "class_reference"),
                          "--device", "cuda" if self.plan.device == "cuda" else "cpu"], trace_unet=True)
        for who, r in (("reference pipeline", ref), ("ours (class-images)", ours)):
            s = r.summary()
            n = run.class_count
            self.rows.append(Row("classgen", label, who, res, n, None, s["wall_s"], s["peak_rss_mib"], None,
                                 s.get("cuda_peak_mib"), None, run.class_steps, 0,
                                 f"{n} images x {run.class_steps} steps, guidance {run.class_guidance}", s))
        plain = wd / "class_images"
        info = self.helper("resize", str(cache), str(plain), str(res))
        if info["count"] != run.class_count:
            raise ChildFailed(f"expected {run.class_count} class images in {cache}, found {info['count']}")
        return plain

    # -- scaling -----------------------------------------------------------------------------------
    def run_scaling(self) -> None:
        p = self.plan
        info = self.helper("model", p.scaling_model)
        model, label = Path(info["path"]), info["label"]
        main = next((r for r in p.models if r.name == p.scaling_model), None)
        src = self.work / p.scaling_model / "class_images"
        n_class = main.class_count if main and src.is_dir() else 0
        if not n_class:
            self.notes.append("scaling: skipped (it reuses the class images of the main run of its model)")
            return
        steps = p.scaling_warmup + p.scaling_measure
        cases = [(res, p.instance_images) for res in p.scaling_resolutions]
        cases += [(p.scaling_image_resolution, n) for n in p.scaling_images if n != p.instance_images]
        # A point the main run already measured (same model, resolution and images) is reused.
        for r in list(self.rows):
            if r.section == "train" and r.who == "ours" and r.model == label and (r.resolution, r.images) in cases:
                self.rows.append(Row(**{**asdict(r), "section": "scaling", "note": "the main run"}))
                cases.remove((r.resolution, r.images))
        for res, n in cases:
            inst = Path(self.helper("instances", str(self.work), str(res), str(n))["path"])
            cls = Path(self.helper("resize", str(src), str(self.work / "scaling" / f"class_{res}px"), str(res))["path"])
            r = self.child(f"scaling_{res}px_{n}img", ["--module", "dreambooth_core", *self.flops_flags(steps)],
                           self.ours_args(model, inst, cls, n_class, res, steps + 1,
                                          self.work / "scaling" / f"out_{res}_{n}"), steps=steps)
            self.train_row(r, "scaling", label, "ours", res, p.scaling_warmup, n, dtype=self.plan.mixed_precision
                           if self.plan.mixed_precision == "bf16" else "fp32")

    # -- ComfyUI -----------------------------------------------------------------------------------
    def run_comfy(self) -> None:
        from bench.comfy_rows import default_hosts, run_comfy_section

        p, a = self.plan, self.args
        hosts = [h for h in default_hosts(a.comfy_python, a.comfy_current_python)
                 if h.version in a.comfy_hosts.split(",")]

        def child(name, wrapper, target, steps, python, env):
            return self.child(name, ["--module", "bench.comfy_child", *wrapper], target, steps=steps, python=python,
                              env=env)

        measured = run_comfy_section(hosts=hosts, models=a.comfy_models.split(","), quick=a.quick,
                                     warmup=p.comfy_warmup, measure=p.comfy_measure, resolution=p.comfy_resolution,
                                     rank=p.rank, lr=p.lr, images=p.instance_images, threads=p.threads,
                                     env=self.env, work=self.logs, child=child, log=self.log, notes=self.notes,
                                     profile=a.profile, matched_only=a.comfy_matched_only,
                                     repeat=a.repeat)
        self.comfy = [asdict(m) | {"share_of_peak": m.share_of_peak} for m in measured]

    # -- the whole run -----------------------------------------------------------------------------
    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        ignore = self.out / ".gitignore"  # results are not sources (as pytest does for its cache)
        if not ignore.exists():
            ignore.write_text("# written by python -m bench\n*\n")
        self.work.mkdir(exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        failures = []
        if not self.args.only_comfy:
            self.check_environment()
            self.log(f"trainers run with {self.python} ({self.versions}); {self.plan.threads} thread(s); "
                     f"device {self.plan.device}")
        for run in ([] if self.args.only_comfy else self.plan.models):
            try:
                self.run_model(run)
            except ChildFailed as exc:
                failures.append(str(exc))
                self.log(f"FAILED: {str(exc)[:2000]}")
        for name, step in (("scaling", self.run_scaling), ("comfy", self.run_comfy)):
            if getattr(self.args, f"no_{name}") or (self.args.only_comfy and name != "comfy"):
                continue
            try:
                step()
            except (ChildFailed, RuntimeError) as exc:
                failures.append(str(exc))
                self.log(f"FAILED: {str(exc)[:2000]}")
        return self.report(failures)

    def pairs(self, model: str) -> List[tuple]:
        """(reference row, our row) of each back-to-back pair of `model` that both finished."""
        train = [r for r in self.rows if r.section == "train" and r.model == model]
        out = []
        for pair in sorted({r.pair for r in train}):
            ref = next((r for r in train if r.pair == pair and r.who == "reference"), None)
            ours = next((r for r in train if r.pair == pair and r.who == "ours"), None)
            if ref and ours and ref.s_per_step and ours.s_per_step:
                out.append((ref, ours))
        return out

    def headline(self) -> tuple:
        """(speedup, memory, which model) from the SD1.5-shaped run if there is one, else the first;
        with several pairs, the median of the pairs' ratios."""
        labels = [r.model for r in self.rows if r.section == "train"]
        pick = next((m for m in labels if m.startswith("SD1.5")), labels[0] if labels else None)
        pairs = self.pairs(pick) if pick else []
        if not pairs:
            return None, None, pick
        speedups = [ref.s_per_step / ours.s_per_step for ref, ours in pairs]
        memories = [ours.peak_rss_mib / ref.peak_rss_mib for ref, ours in pairs]
        return statistics.median(speedups), statistics.median(memories), pick

    def report(self, failures: List[str]) -> int:
        from bench.report import format_table

        speedup, memory, pick = self.headline()
        pairs = self.pairs(pick) if pick else []
        per_pair = [{"pair": ours.pair, "speedup": ref.s_per_step / ours.s_per_step,
                     "memory": ours.peak_rss_mib / ref.peak_rss_mib} for ref, ours in pairs]
        results = {"plan": asdict(self.plan), "versions": getattr(self, "versions", {}), "python": self.python,
                   "machine": machine(), "rows": [asdict(r) for r in self.rows], "notes": self.notes,
                   "failures": failures, "repeat": self.args.repeat, "comfy": self.comfy,
                   "headline": {"model": pick, "speedup": speedup, "memory": memory, "pairs": per_pair},
                   "seconds": round(time.time() - self.t0, 1)}
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        chart = None if self.args.only_comfy else subprocess.run(
            [self.python, "-m", "bench.chart", str(self.out / "results.json"), str(self.out / "chart.png")],
            cwd=str(REPO), env=self.env, capture_output=True, text=True)
        if chart is not None and chart.returncode != 0:
            self.notes.append(f"chart not drawn: {chart.stderr[-500:]}")
        print()
        print(format_table(results))
        for n in self.notes:
            print(f"note: {n}")
        for f in failures:
            print(f"FAILED: {f.splitlines()[0]}")
        print(f"results: {self.out / 'results.json'}; chart: {self.out / 'chart.png'}; logs: {self.logs}")
        comfy_line = comfy_headline(self.comfy)
        if comfy_line:
            print(comfy_line)
        if self.args.only_comfy:
            return 1 if failures or not comfy_line else 0
        if speedup is None:
            print("speedup=nan memory=nan")
            return 1
        ref, ours = pairs[0]
        tp = (f"{ours.training_peak_rss_mib / ref.training_peak_rss_mib:.2f}"
              if ours.training_peak_rss_mib and ref.training_peak_rss_mib else "n/a")
        print(f"headline from {pick} at {ours.resolution} px on {self.plan.device} ({self.plan.threads} thread(s)): "
              f"speedup = reference s/step / ours; memory = our peak RSS / reference peak RSS (whole process; "
              f"training steps only, first pair: {tp})")
        if len(pairs) > 1:
            print("back-to-back pairs: " + ", ".join(f"x{p['speedup']:.2f} at {p['memory']:.2f}" for p in per_pair)
                  + "; the headline is their median")
        print(f"speedup={speedup:.2f} memory={memory:.2f}")
        return 1 if failures else 0


def comfy_headline(comfy: List[dict]) -> Optional[str]:
    """The ComfyUI section's line: the matched ratios on every host and model that ran (with several
    back-to-back pairs, their median, each pair's ratios in brackets)."""
    from bench.comfy_rows import after_load_ratios, pair_ratios, ratios

    r, each, after = ratios(comfy), pair_ratios(comfy), after_load_ratios(comfy)
    parts = []
    for (host, model, case), (s, m) in sorted(r.items()):
        if case != "matched":
            continue
        pairs = [v for k, v in sorted(each.items()) if k[:3] == (host, model, case)]
        detail = f" (median of {', '.join(f'x{ps:.2f} at {pm:.2f}' for ps, pm in pairs)})" if len(pairs) > 1 else ""
        al = after.get((host, model, case))
        parts.append(f"{host} {model}: x{s:.2f} at {m:.2f}" + (f", {al:.2f} after the load" if al else "") + detail)
    return ("ComfyUI matched (speedup = TrainLoraNode s/step / ours; memory = our peak RSS / its; after the load = "
            "the same from the end of the model load both share): " + "; ".join(parts) if parts else None)


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": sys.platform}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def detect_device(python: str) -> str:
    probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                           text=True)
    return "cuda" if probe.stdout.strip() == "True" else "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and smaller resolutions (a few minutes on CPU)")
    p.add_argument("--output", default="bench_out", help="folder for results.json, chart.png, logs/ and work/")
    p.add_argument("--models", default=None, help="comma-separated subset of the plan's models (embedded, sd15; sdxl "
                   "on CUDA; tiny-sdxl: a tiny SDXL-layout model that checks the SDXL path on any machine)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every trainer process (default 1 on CPU, min(8, cores) on CUDA)")
    p.add_argument("--python", default=None, help="Python that runs both trainers (default .venv-bench/bin/python)")
    p.add_argument("--comfy-python", default=None,
                   help="ComfyUI 0.3.64's Python (default .venv-comfyui/bin/python; its folder: COMFYUI_DIR)")
    p.add_argument("--comfy-current-python", default=None,
                   help="ComfyUI 0.33's Python (default .venv-comfyui-current/bin/python; its folder: "
                        "COMFYUI_CURRENT_DIR)")
    p.add_argument("--comfy-hosts", default="0.3.64,0.33", help="which ComfyUI versions the ComfyUI section runs")
    p.add_argument("--comfy-models", default="sd15,sd3_d8",
                   help="models of the ComfyUI section: sd15 (mini SD1.5), sd3_d8 (SD3, 8 blocks, 512 wide: flow "
                        "matching), sd3 (the tests' tiny SD3)")
    p.add_argument("--only-comfy", action="store_true",
                   help="only the ComfyUI section (no .venv-bench or reference script needed)")
    p.add_argument("--comfy-matched-only", action="store_true",
                   help="ComfyUI section: only the matched rows (what --quick runs), at the full plan's size")
    p.add_argument("--profile", action="store_true",
                   help="ComfyUI section: also split each trainer's matched step into phases (bench.phases)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the reference and ours N times, alternating, and report the median of the N pairs' "
                        "ratios (for a machine whose speed drifts over minutes); the ComfyUI section likewise "
                        "alternates the host's trainer and ours")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--no-comfy", action="store_true")
    p.add_argument("--no-extras", action="store_true",
                   help="skip the extra rows (reference with our malloc settings; ours without gradient "
                        "checkpointing, with attention or full checkpointing, with kohya's LoRA set)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat < 1:
        raise SystemExit(f"--repeat {args.repeat}: give 1 or more pairs")
    python = args.python or default_python()
    device = detect_device(python) if args.device == "auto" else args.device
    threads = args.threads or (1 if device == "cpu" else min(8, os.cpu_count() or 1))
    plan = make_plan(args.quick, device, threads, args.models.split(",") if args.models else None)
    return Bench(args, plan).run()


if __name__ == "__main__":
    raise SystemExit(main())
