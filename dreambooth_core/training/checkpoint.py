"""A run's checkpoint: trained parameters and optimizer state as safetensors + JSON, so a run
resumes exactly without pickle (the trainer draws every step's samples and noise from a generator
seeded by (seed, step): no RNG state to keep); and what a resumed run must share with it."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .. import fileio
from ..config import TrainConfig

META_KEY = "dreambooth_checkpoint"
FRESH_RUN = "start a fresh run (resume off, or another save name / output folder)"
# What each step draws and how its loss is made, beyond the signature's first fields: a resumed run
# with another value would continue a different training than its checkpoint's.
OBJECTIVE_SETTINGS = ("batch_size", "gradient_accumulation", "prior_weight", "min_snr_gamma", "offset_noise",
                      "caption_dropout", "mask_background_weight")


class CheckpointMismatch(ValueError):
    pass


def objective_settings(config: dict, masked: bool, processes: int = 1) -> Dict[str, object]:
    """OBJECTIVE_SETTINGS of a config (TrainConfig.to_dict(), or a checkpoint's saved one, where a
    setting it predates has its default), in one form per meaning: a setting that is off or unused
    (λ without prior, a background weight without masks) is None. The batch counts all processes':
    their global batch is what each step draws."""
    c = {**TrainConfig().to_dict(), **config}
    return {"batch_size": int(c["batch_size"]) * processes,
            "gradient_accumulation": int(c["gradient_accumulation"]),
            "prior_weight": float(c["prior_weight"]) if c["prior"] else None,
            "min_snr_gamma": float(c["min_snr_gamma"]) if c["min_snr_gamma"] else None,
            "offset_noise": float(c["offset_noise"]),
            "caption_dropout": float(c["caption_dropout"]),
            "mask_background_weight": float(c["mask_background_weight"]) if masked else None}


def save(path: Path, *, step: int, named, optimizer, signature: dict, history: List[dict], config: dict) -> Path:
    """The parameters `named` ((name, tensor) pairs), the optimizer's state, and what resuming checks."""
    tensors = {f"param.{n}": p.detach() for n, p in named}
    opt_tensors, opt_meta = optimizer_tensors(getattr(optimizer, "optimizer", optimizer))
    tensors.update(opt_tensors)
    meta = {"step": step, "signature": signature, "optimizer": opt_meta, "history": history, "config": config}
    fileio.save_tensors(path, tensors, {META_KEY: json.dumps(meta, default=str)})
    return path


def read_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(META_KEY, "{}"))


def check_resumable(path: Path, meta: dict, expected: dict, steps: int, processes: int) -> int:
    """The step to resume from, or CheckpointMismatch naming each setting that differs from the
    run's `expected` signature (old value, new value, what to do)."""
    saved = meta.get("config") or {}
    got = dict(meta.get("signature", {}))
    got.setdefault("lora_targets", "transformer")  # checkpoints from before the option had only that set
    got.setdefault("masked_loss", False)  # ... and from before masks
    got.setdefault("optimizer", "adamw")  # ... and from before the optimizer could be chosen
    if saved:  # ... and from before the objective's settings: their config tells them (same processes)
        for k, v in objective_settings(saved, got["masked_loss"], processes).items():
            got.setdefault(k, v)
    for k in ("flip", *OBJECTIVE_SETTINGS):  # where nothing tells, taken as unchanged
        got.setdefault(k, expected[k])
    diff = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    if diff:
        listed = "; ".join(f"{k}: {a} in the checkpoint, {b} now" for k, (a, b) in diff.items())
        raise CheckpointMismatch(
            f"{path} was saved with other settings ({listed}). They decide what is trained, so a resumed "
            f"run cannot change them: set {'it' if len(diff) == 1 else 'them'} back to resume, or {FRESH_RUN}")
    start = int(meta["step"])
    if start > steps:
        raise CheckpointMismatch(f"{path} has trained {start} steps, more than steps={steps}: set steps to "
                                 f"{start} or more to continue from it, or {FRESH_RUN}")
    return start


def restore(path: Path, meta: dict, named, optimizer) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
    load_optimizer(optimizer, tensors, meta["optimizer"])


def take_current_rates(optimizer, fresh: List[tuple], saved: dict, config: TrainConfig, start: int,
                       factor: float) -> Optional[str]:
    """The restored optimizer holds the checkpoint run's learning rates and weight decay; the
    resumed run trains with `fresh` ((lr, weight decay) per group, set now: a lower rate is the
    advice after a divergence), on the schedule of its own `steps` (LambdaLR scales each group's
    `initial_lr`; `factor` is the schedule's at `start`). Returns a "resuming" line naming what
    changed, with the learning rate it gives the next step, or None."""
    c = config
    changes = [f"{k} {saved[k]} -> {getattr(c, k)}" for k in ("steps", "lr_scheduler", "lr_warmup_steps")
               if k in saved and saved[k] != getattr(c, k)]
    was = optimizer.param_groups[0]["lr"]  # what the checkpoint's run would have used next
    first = None  # the UNet group's (old, new) base rate; the text encoders' group follows it by default
    for name, group, (lr, decay) in zip(("learning_rate", "text_encoder_lr"), optimizer.param_groups, fresh):
        rate = (group.get("initial_lr", group["lr"]), lr)
        if rate[0] != lr and rate != first:
            changes.append(f"{name} {rate[0]:g} -> {lr:g}")
        if group["weight_decay"] != decay and first is None:
            changes.append(f"weight_decay {group['weight_decay']:g} -> {decay:g}")
        first = first or rate
        group.update(initial_lr=lr, lr=lr * factor, weight_decay=decay)
    if not changes:
        return None
    now = optimizer.param_groups[0]["lr"]
    next_rate = f"learning rate at step {start + 1}: {now:g}" + (
        f"; the checkpoint's run would have used {was:g}" if not math.isclose(was, now) else "")
    return (f"resuming at step {start} of {c.steps} with settings changed since the checkpoint, which "
            f"apply from step {start + 1}: {', '.join(changes)} ({next_rate})")


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state_dict into tensors (for safetensors) and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                   prefix: str = "optim") -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, rest in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(rest)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

