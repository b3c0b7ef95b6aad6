"""Run one program (a script or a module, unmodified) in this process and record how it ran.

    python -m bench.child --record OUT.json [--threads N] [--steps N] [--trace-unet]
                          (--script PATH | --module NAME) -- ARGS...

The program runs through ``runpy`` exactly as ``python PATH ARGS`` / ``python -m NAME ARGS``
would run it. Before it starts, this wrapper

- pins torch's intra-op threads (``torch.set_num_threads``; the parent also sets
  OMP_NUM_THREADS/MKL_NUM_THREADS), the same for every program the benchmark runs;
- registers torch's *global* optimizer post-step hook (``register_optimizer_step_post_hook``):
  every ``optimizer.step()`` of any torch optimizer, whoever calls it, stamps the time. Both
  trainers step ``torch.optim.AdamW`` once per training step (no gradient accumulation here), so
  step k ends at ``step_times[k-1]``;
- splits the peak resident memory into phases with the kernel's own high-water mark: at the end
  of step 1 it reads VmHWM (peak of loading, caching and the first step) and resets it by writing
  5 to /proc/self/clear_refs; at the end of step ``--steps`` it reads VmHWM again (the peak of the
  steady training steps 2..N) and resets it once more; at exit it reads it a last time (saving,
  and whatever the program does after training). The process's overall peak is the maximum of
  the three. A program that loads a model both trainers share (bench.comfy_child: the host's own
  checkpoint loader) calls ``bench.child.model_loaded()`` after loading: the peak so far becomes a
  phase of its own, "load", so the trainer's peak can be told from the loader's. Where clear_refs
  cannot be written the parent's own polling of VmRSS is used;
- on CUDA, the same phases with torch.cuda.max_memory_allocated / reset_peak_memory_stats;
- with ``--trace-unet``, times every diffusers UNet2DConditionModel forward (class-image
  generation: the span from the first to the last UNet call is the sampling time);
- with ``--flops-step K``, counts the FLOPs of optimizer step K (forward, backward and optimizer:
  ``torch.utils.flop_counter.FlopCounterMode`` from the end of step K-1 to the end of step K). The
  counter slows that step down, so step K is kept out of ``step_times``: the program must run one
  step more than ``--steps``, and K should be that last step;
- with ``--phases``, splits every step into data / forward / backward / optimizer (bench.phases;
  a profile: its hooks cost time, so such a run is not a timed row).

The record is written atomically to OUT.json when the program ends (also on an exception or
sys.exit).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
import traceback


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_RECORDER = None  # the running wrapper's Recorder (main() sets it)


def model_loaded() -> None:
    """Called by the measured program once its model is loaded; nothing outside bench.child's run."""
    if _RECORDER is not None and not _RECORDER.rec["step_times"] and "load" not in _RECORDER.rec["rss_phases_kib"]:
        _RECORDER.close_phase("load", reset=True)


class Recorder:
    def __init__(self, steps: int | None, flops_step: int | None = None, phases=None):
        self.steps = steps
        self.flops_step = flops_step
        self.flops = None  # the FlopCounterMode while it counts
        self.count = 0  # optimizer steps so far, the FLOP step included
        self.phases = phases
        self.rec = {"start": time.time(), "step_times": [], "rss_phases_kib": {}, "cuda_phases_bytes": {},
                    "hwm_reset": None, "unet_calls": 0, "unet_first_start": None, "unet_last_end": None,
                    "unet_seconds": 0.0}

    # -- memory phases --------------------------------------------------------------------------
    def _cuda(self):
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch
        return None

    def close_phase(self, name: str, reset: bool) -> None:
        self.rec["rss_phases_kib"][name] = _status_kib("VmHWM")
        if reset:
            ok = reset_hwm()
            self.rec["hwm_reset"] = ok if self.rec["hwm_reset"] is None else (self.rec["hwm_reset"] and ok)
        torch = self._cuda()
        if torch is not None:
            self.rec["cuda_phases_bytes"][name] = {"max_allocated": torch.cuda.max_memory_allocated(),
                                                   "max_reserved": torch.cuda.max_memory_reserved()}
            if reset:
                torch.cuda.reset_peak_memory_stats()

    # -- hooks ----------------------------------------------------------------------------------
    def on_optimizer_step(self, optimizer, args, kwargs) -> None:
        torch = self._cuda()
        if torch is not None:
            torch.cuda.synchronize()
        now = time.time()
        self.count += 1
        if self.phases is not None:
            self.phases.on_step_end()
        if self.flops is not None and self.count == self.flops_step:
            self.flops.__exit__(None, None, None)
            self.rec.update(flops_per_step=self.flops.get_total_flops(), flops_step_s=now - self.flops_t0)
            self.flops = None
            return
        times = self.rec["step_times"]
        times.append(now)
        n = len(times)
        if self.flops_step and self.count == self.flops_step - 1:
            from torch.utils.flop_counter import FlopCounterMode

            self.flops = FlopCounterMode(display=False)
            self.flops.__enter__()
            self.flops_t0 = time.time()
        if n == 1:
            self.close_phase("setup_and_step1", reset=True)
        if self.steps and n == self.steps and n > 1:
            self.close_phase("steps_2_to_n", reset=True)

    def trace_unet(self) -> None:
        from diffusers import UNet2DConditionModel

        original = UNet2DConditionModel.forward
        rec = self.rec

        def forward(module, *args, **kwargs):
            t0 = time.time()
            if rec["unet_first_start"] is None:
                rec["unet_first_start"] = t0
            try:
                return original(module, *args, **kwargs)
            finally:
                t1 = time.time()
                rec["unet_last_end"] = t1
                rec["unet_calls"] += 1
                rec["unet_seconds"] += t1 - t0

        UNet2DConditionModel.forward = forward

    def finish(self, path: str, exit_code: int, error: str | None) -> None:
        if self.flops is not None:  # the program ended inside the counted step
            self.flops.__exit__(None, None, None)
            self.rec["flops_error"] = "the program ended before the counted step did"
        if self.phases is not None:
            self.rec["phases"] = self.phases.steps
        self.close_phase("after_training" if self.rec["step_times"] else "whole_run", reset=False)
        self.rec.update(end=time.time(), exit_code=exit_code, error=error)
        tmp = f"{path}.{os.getpid()}.partial"
        with open(tmp, "w") as f:
            json.dump(self.rec, f, indent=1)
        os.replace(tmp, path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m bench.child --record OUT.json (--script P | --module M) -- ARGS")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m bench.child")
    p.add_argument("--record", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="training steps the program will run")
    p.add_argument("--trace-unet", action="store_true")
    p.add_argument("--flops-step", type=int, default=None, help="count this optimizer step's FLOPs (>= 2)")
    p.add_argument("--phases", action="store_true", help="split each step into phases (bench.phases)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--script")
    target.add_argument("--module")
    opts = p.parse_args(argv[:split])
    args = argv[split + 1:]

    if opts.flops_step is not None and opts.flops_step < 2:
        raise SystemExit("--flops-step: give 2 or more (step 1 includes loading)")
    phases = None
    if opts.phases:
        from bench.phases import PhaseTimer

        phases = PhaseTimer()
        os.environ["BENCH_PHASES"] = "1"  # programs that know bench.phases add their own timers
    rec = Recorder(opts.steps, opts.flops_step, phases)
    global _RECORDER
    _RECORDER = rec
    # Run as `python -m bench.child` this module is __main__: a program's `import bench.child` must find
    # this instance (and its Recorder), not load a second copy.
    sys.modules.setdefault("bench.child", sys.modules[__name__])
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    rec.rec["threads"] = torch.get_num_threads()
    rec.rec["torch"] = torch.__version__
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(rec.on_optimizer_step)
    if phases is not None:
        phases.install()
    if opts.trace_unet:
        rec.trace_unet()

    code, error = 0, None
    try:
        if opts.script:
            sys.argv = [opts.script] + args
            sys.path.insert(0, os.path.dirname(os.path.abspath(opts.script)))
            runpy.run_path(opts.script, run_name="__main__")
        else:
            sys.argv = [opts.module] + args
            runpy.run_module(opts.module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code not in (None, 0) and not isinstance(exc.code, int):
            error = str(exc.code)
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised as an exit code
        code, error = 1, "".join(traceback.format_exception(exc))[-4000:]
        traceback.print_exc()
    finally:
        rec.finish(opts.record, code, error)
    return code


if __name__ == "__main__":
    sys.exit(main())
