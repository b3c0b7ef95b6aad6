"""Profile our trainer in-process: resident memory at each phase and torch.profiler's top ops.

    python -m bench.profile_ours --model DIR --instance-dir DIR --class-dir DIR --resolution 128
        [--steps 4] [--profile-steps 2] [--threads 1] [--no-lean] [--out profile.txt]
        [--lora-targets transformer|attention] [--gradient-checkpointing off|attention-hires|attention|full]

Runs the same path as ``python -m dreambooth_core train`` (``commands.run_training``), with
callbacks that print VmRSS/VmHWM at each phase ("caching", "training", every step; VmHWM restarts
after each step, so a step's line shows its own peak) and with
torch.profiler recording the last ``--profile-steps`` steps (CPU time by operator, with input
shapes). This is what the optimisation choices in bench/README.md were based on.
"""
from __future__ import annotations

import argparse
import os
import time

from bench.child import reset_hwm


def _mem() -> str:
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0]) // 1024
    return " ".join(f"{k}={v}M" for k, v in vals.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--instance-dir", required=True)
    p.add_argument("--class-dir", required=True)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lean", action=argparse.BooleanOptionalAction, default=True,
                   help="what `train` on the command line does (release encoders, malloc tuning)")
    p.add_argument("--lora-targets", choices=("transformer", "attention"), default="transformer")
    p.add_argument("--gradient-checkpointing", nargs="?", const="full", default="off",
                   choices=("off", "attention-hires", "attention", "full"))
    p.add_argument("--out", default=None)
    p.add_argument("--output-dir", default="/tmp/bench-profile-out")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from dreambooth_core.cli import commands
    from dreambooth_core.training import trainer
    from dreambooth_core.config import TrainConfig

    print(f"start: {_mem()}", flush=True)
    n_images = len([x for x in __import__("pathlib").Path(a.class_dir).iterdir()])
    config = TrainConfig(model=a.model, instance_dir=a.instance_dir, class_dir=a.class_dir, token="sks",
                         class_noun="star", num_class_images=n_images, resolution=a.resolution, steps=a.steps,
                         rank=4, learning_rate=1e-4, seed=0, output_dir=a.output_dir,
                         lora_targets=a.lora_targets, gradient_checkpointing=a.gradient_checkpointing).validate()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                  schedule=torch.profiler.schedule(wait=a.steps - a.profile_steps - 1 if a.steps > a.profile_steps + 1 else 0,
                                                                   warmup=1 if a.steps > a.profile_steps else 0,
                                                                   active=a.profile_steps))
    t = {"last": time.perf_counter()}
    original_train = trainer.train

    def on_phase(name):
        print(f"phase {name}: {_mem()}", flush=True)

    def on_step(info):
        # CPU seconds (user+sys) beside wall seconds: on a shared machine the wall time of a step
        # grows with the load, its CPU time much less.
        now, cpu = time.perf_counter(), os.times()
        used = cpu.user + cpu.system - t.get("cpu", cpu.user + cpu.system)
        print(f"step {info.step}: {now - t['last']:.2f} s (cpu {used:.2f} s, sys "
              f"{cpu.system - t.get('sys', cpu.system):.2f} s)  {_mem()}", flush=True)
        t.update(last=now, cpu=cpu.user + cpu.system, sys=cpu.system)
        reset_hwm()  # so that the next step's line shows its own peak, not the first step's
        prof.step()

    def patched(backend, config, instance, class_images=None, callbacks=None, accelerator=None, flip=None,
                **kw):
        print(f"loaded: {_mem()}", flush=True)
        callbacks = callbacks or trainer.Callbacks()
        inner = callbacks.on_step

        def chained(info):
            if inner:
                inner(info)
            on_step(info)

        callbacks.on_step, callbacks.on_phase = chained, on_phase
        return original_train(backend, config, instance, class_images, callbacks, accelerator, flip, **kw)

    trainer.train = patched
    with prof:
        commands.run_training(config, lean=a.lean)
    print(f"end: {_mem()}", flush=True)
    table = prof.key_averages(group_by_input_shape=False).table(sort_by="self_cpu_time_total", row_limit=30)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table)
            f.write("\n\n")
            f.write(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
