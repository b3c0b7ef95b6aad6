"""One DreamBooth LoRA step, set up and run as `training/trainer.py` does it, on a backend whose
tensors are real (the self-check) or fake (the estimate).

Setup follows `DreamBoothTrainer.run` / `_trainable`: kohya targets narrowed by `select_lora_targets`,
a `LoRANetwork` attached through the backend, the backend's gradient checkpointing, `make_optimizer`.
A step follows `_forward_loss` / `_micro_step` (the merged instance + class batch, or with
prior_pass "separate" each part's forward and backward in turn, `_backward_by_part`): the schedule's
noisy inputs and targets, `predict` under autocast, `dreambooth_loss`, backward, gradient clipping,
the optimizer's step, `zero_grad(set_to_none=True)`. What it leaves out touches no GPU memory:
the NaN check's one-element tensor, the loss history, accelerate's wrapping."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from dreambooth_core.adapters import LoRANetwork
from dreambooth_core.adapters.kohya import select_lora_targets
from dreambooth_core.backends.base import cat_conds
from dreambooth_core.training import objective
from dreambooth_core.training.optimizers import make_optimizer

from . import architectures, fake
from .frozen import recast_linears
from .settings import Setting
from .tracker import StorageTracker

RANK = 4  # TrainConfig's default rank (alpha = rank)
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM, PRIOR_WEIGHT = 1e-4, 1e-2, 1.0, 1.0


@dataclass
class Prepared:
    """A backend with LoRA attached, its trainable parameters, and the cached inputs of one step."""

    backend: object
    setting: Setting
    step_modules: List[nn.Module]
    encoders: List[nn.Module]
    network: LoRANetwork
    params: List[nn.Parameter] = field(default_factory=list)
    optimizer: Optional[torch.optim.Optimizer] = None
    inputs: List[tuple] = field(default_factory=list)  # (latents, cond) per part: instance, class
    schedule: object = None


def prepare(spec: architectures.Spec, setting: Setting, *, mode: Optional[fake.FakeTensorMode] = None,
            seed: int = 0) -> Prepared:
    """The trainer's setup. With `mode` (a fake mode) the model is built on meta and made fake;
    without it, real seeded weights on the CPU."""
    build_dtype = torch.bfloat16 if setting.base == "fp8" else setting.storage_dtype
    backend = architectures.build(spec, build_dtype, meta=mode is not None, seed=seed)
    return attach(backend, spec, setting, mode=mode, seed=seed)


def attach(backend, spec: architectures.Spec, setting: Setting, *, mode: Optional[fake.FakeTensorMode] = None,
           seed: int = 0) -> Prepared:
    """The trainer's setup on a built backend (`prepare`'s second half; bench/gpu_flux.py gives it
    one built on a GPU). With `mode`, the backend was built on meta and is made fake here."""
    meta = mode is not None
    step_modules, encoders = architectures.modules_of(backend)
    if spec.kind == "flux":
        # The host's flow path: frozen Linears read their weight again in backward; fp8 re-stores them.
        recast_linears(step_modules[0], setting.compute_dtype,
                       torch.float8_e4m3fn if setting.base == "fp8" else None)
    elif setting.base == "fp8":
        raise ValueError(f"setting {setting.key!r}: an fp8 base is modelled for the flow path (flux) only")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        targets = select_lora_targets(backend.lora_targets(True, False, conv=False), setting.lora_targets)
        network = LoRANetwork(targets, rank=RANK, alpha=RANK)
    backend.attach_lora(network)
    if meta:
        fake.make_fake(step_modules + encoders, mode)  # adapters are children of their base modules now
        if hasattr(backend, "_device"):
            backend._device = fake.DEVICE  # built on meta; its tensors are fake CPU tensors now
    prepared = Prepared(backend, setting, step_modules, encoders, network)
    prepared.params = [p for adapter in network.adapters.values() for _, p in adapter.named_parameters()]
    if setting.checkpointing != "off":
        full = setting.checkpointing == "full"
        backend.set_gradient_checkpointing(True if full else setting.checkpointing)
    for m in backend.trainable_models(True, False):
        m.train()
    optimizer = "adamw" if setting.optimizer == "adamw8bit" and not bitsandbytes_present() else setting.optimizer
    prepared.optimizer = make_optimizer(optimizer, [{"params": prepared.params, "lr": LEARNING_RATE}], WEIGHT_DECAY)
    prepared.schedule = backend.schedule()
    with mode if meta else contextlib.nullcontext():
        prepared.inputs = _cached_inputs(spec, setting)
    return prepared


def bitsandbytes_present() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _cached_inputs(spec: architectures.Spec, setting: Setting) -> List[tuple]:
    """What caching leaves for each part: fp32 latents (encode_images returns float) and the text
    encoders' output in the frozen dtype (fp8 bases keep their encoders in bf16)."""
    cond_dtype = setting.compute_dtype
    parts = 2 if setting.prior else 1
    out = []
    for _ in range(parts):
        latents = torch.randn(1, *architectures.latent_shape(spec))
        cond = {k: torch.randn(*shape, dtype=cond_dtype) for k, shape in architectures.cond_shapes(spec).items()}
        if "time_ids" in cond:
            cond["time_ids"] = torch.tensor([[spec.resolution, spec.resolution, 0, 0, spec.resolution,
                                              spec.resolution]], dtype=cond_dtype)
        out.append((latents, cond))
    return out


def _autocast(setting: Setting, device_type: str = fake.DEVICE.type):
    if not setting.autocast:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=setting.compute_dtype)


def train_step(p: Prepared, generator: torch.Generator, tracker: Optional[StorageTracker] = None) -> torch.Tensor:
    """One optimizer step; returns the (detached) loss."""
    dev = p.backend.device
    draws = [(lat, objective.sample_noise(lat.shape, generator), p.schedule.sample_timesteps(lat.shape[0], generator),
              cond) for lat, cond in p.inputs]
    batches = [p.schedule.noised(lat.to(dev), noise.to(dev), t.to(dev), None) for lat, noise, t, _ in draws]
    # the trainer's _backward_by_part: each part's forward and backward in turn; else one merged pass
    passes = [[k] for k in range(len(batches))] if p.setting.prior_pass == "separate" else [list(range(len(batches)))]
    total = torch.zeros(())
    for part in passes:
        with _autocast(p.setting, dev.type):
            merged = objective.NoisedBatch(*(torch.cat([getattr(batches[k], f) for k in part])
                                             for f in ("noisy", "timesteps", "target", "weight")))
            pred = p.backend.predict(merged.noisy, merged.timesteps, cat_conds([draws[k][3] for k in part]))
        instance_part = part[0] == 0  # a class part alone: its mean loss, times λ
        loss = objective.dreambooth_loss(pred, merged, draws[0][0].shape[0] if instance_part else merged.noisy.shape[0],
                                         PRIOR_WEIGHT)
        scale = 1.0 if instance_part else PRIOR_WEIGHT
        del pred, merged
        (scale * loss.total).backward()
        total = total + scale * loss.total.detach()
    del batches
    torch.nn.utils.clip_grad_norm_(p.params, MAX_GRAD_NORM)
    with tracker.phase("optim") if tracker is not None else contextlib.nullcontext():
        p.optimizer.step()
    p.optimizer.zero_grad(set_to_none=True)
    return total


def tracked_steps(p: Prepared, tracker: StorageTracker, steps: int = 2, seed: int = 0) -> None:
    """Count what is resident before the first step (frozen weights, the encoders where they stay,
    LoRA, cached inputs), then run `steps` steps (the second one starts with the optimizer's state)."""
    weights = [t for m in p.step_modules for t in _own_tensors(m, exclude=p.params)]
    if p.setting.encoders_on_gpu:
        weights += [t for m in p.encoders for t in _own_tensors(m, exclude=p.params)]
    tracker.tag(weights, "weights")
    tracker.tag(p.params, "lora")
    tracker.tag([t for lat, cond in p.inputs for t in (lat, *cond.values())], "act")
    for param in p.params:  # gradients of the adapters count with them
        param.register_post_accumulate_grad_hook(lambda q: tracker.tag([q.grad], "lora"))
    generator = torch.Generator().manual_seed(seed)
    with tracker:
        for _ in range(steps):
            train_step(p, generator, tracker)


def _own_tensors(module: nn.Module, exclude: List[nn.Parameter]) -> List[torch.Tensor]:
    skip = {id(q) for q in exclude}
    return [t for t in list(module.parameters()) + list(module.buffers()) if id(t) not in skip]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.untyped_storage().nbytes() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def adamw8bit_state_bytes(params: List[nn.Parameter], block: int = 256, min_8bit: int = 4096) -> int:
    """bitsandbytes' AdamW8bit state: two uint8 moments plus one fp32 absmax per 256-value block
    for a tensor of at least 4096 values; two fp32 moments for smaller ones (its min_8bit_size)."""
    total = 0
    for p in params:
        n = p.numel()
        total += 2 * (n + 4 * -(-n // block)) if n >= min_8bit else 8 * n
    return total
