"""The DreamBooth training loop, backend-agnostic, on accelerate.

Frozen parts are computed once: VAE latents of every training image (and its mirror image when
flipping is allowed) and, while the text encoder is frozen, the embedding of every caption.
Each step then draws instance and class samples for the *global* batch from a generator seeded
by (seed, step), and each process takes its slice: one process with batch 2·B and two processes
with batch B see exactly the same samples and noise, and a resumed run continues exactly where
it stopped.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Type

import numpy as np
import torch

from .. import __version__, fileio
from . import checkpoint, objective
from ..fileio import safe_name
from ..backends.base import Backend, Cond, cat_conds
from ..config import TrainConfig
from ..adapters import LoRANetwork, save_lora
from ..adapters.kohya import lora_metadata

CHECKPOINT_NAME = "checkpoint.safetensors"
# kohya names of attention projections: the UNet's attn1/attn2 to_q/to_k/to_v/to_out.0 and the
# CLIP text encoders' self_attn q/k/v/out_proj (what `lora_targets="attention"` keeps).
ATTENTION_PROJECTION = re.compile(r"(_attn\d+_to_(q|k|v|out_0)|_self_attn_(q|k|v|out)_proj)$")


class TrainingDiverged(RuntimeError):
    pass


class CheckpointMismatch(ValueError):
    pass


class Example(Protocol):
    image: "object"  # PIL.Image.Image
    caption: str


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    instance_loss: float
    prior_loss: Optional[float]
    lr: float
    seconds_per_step: float
    eta_seconds: float


@dataclass
class Callbacks:
    on_step: Optional[Callable[[StepInfo], None]] = None
    should_stop: Optional[Callable[[], bool]] = None
    on_preview: Optional[Callable[[int, List[np.ndarray]], None]] = None
    # "caching", "training", "saving"; and a line starting "resuming" when a resumed run takes settings
    # that differ from its checkpoint's (a new learning rate, more steps)
    on_phase: Optional[Callable[[str], None]] = None
    #: Exceptions that mean Cancel. A host that raises its interrupt from inside the model (ComfyUI
    #: since 0.3.65, mid forward or backward, and mid preview) names it here: the run then ends as
    #: "cancelled" with a checkpoint of the last finished step, exactly as should_stop() ends it.
    cancelled_by: Tuple[Type[BaseException], ...] = ()


@dataclass
class TrainResult:
    status: str  # "completed" | "cancelled"
    step: int
    output_dir: Path
    lora_path: Optional[Path] = None
    full_paths: List[str] = field(default_factory=list)
    checkpoint_path: Optional[Path] = None
    history: List[dict] = field(default_factory=list)
    network: Optional[LoRANetwork] = None


def pil_to_tensor(image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup and schedule != "constant":
            return (step + 1) / warmup
        if schedule in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def _accumulate(acc, models):
    """accelerate >= 0.22 accumulates over several models; 0.21 (the WebUI's pin) over one."""
    try:
        return acc.accumulate(*models)
    except TypeError:
        return acc.accumulate(models[0] if models else None)


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step * 1009 + micro) % (2**63))


@dataclass
class _Bucket:
    latents: torch.Tensor  # (N, C, h, w)
    flipped: Optional[torch.Tensor]
    captions: List[str]
    size: tuple  # (H, W) in pixels
    masks: Optional[torch.Tensor] = None  # (N, 1, h, w) in [0, 1] at latent size: subject masks


class DreamBoothTrainer:
    def __init__(self, backend: Backend, config: TrainConfig, instance: Sequence[Example],
                 class_images: Optional[Sequence[Example]] = None, callbacks: Optional[Callbacks] = None,
                 accelerator=None, flip: Optional[bool] = None, release_frozen: bool = False):
        if not instance:
            raise ValueError("instance images: none given; DreamBooth needs 3-30 photos of the subject")
        if config.prior and not class_images:
            raise ValueError("class images: prior preservation is on but no class images were given "
                             "(generate them with ensure_class_images, or turn prior off)")
        self.backend, self.config = backend, config.validate()
        self.instance, self.class_images = list(instance), list(class_images or []) if config.prior else []
        self.callbacks = callbacks or Callbacks()
        self.flip = config.flip if flip is None else flip
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or self._make_accelerator()
        self.network: Optional[LoRANetwork] = None
        self.history: List[dict] = []
        # Free the VAE and frozen text encoders once their outputs are cached, where nothing later
        # in the run needs them (the CLI's train command; the demo samples after training).
        self.release_frozen = release_frozen

    # -- setup -------------------------------------------------------------------------------
    def _make_accelerator(self):
        from .accel import make_accelerator

        return make_accelerator(self.config, self.backend.device)

    def _phase(self, name: str) -> None:
        if self.callbacks.on_phase:
            self.callbacks.on_phase(name)

    @torch.no_grad()
    def _cache_images(self, examples: Sequence[Example], flip: bool) -> List[_Bucket]:
        groups: Dict[tuple, List[Example]] = {}
        for ex in examples:
            groups.setdefault((ex.image.height, ex.image.width), []).append(ex)
        buckets = []
        for size, items in sorted(groups.items()):
            pixels = torch.stack([pil_to_tensor(ex.image) for ex in items])
            latents = torch.cat([self.backend.encode_images(pixels[i:i + 8]) for i in range(0, len(items), 8)])
            flipped = None
            if flip:
                mirrored = pixels.flip(-1)
                flipped = torch.cat([self.backend.encode_images(mirrored[i:i + 8]) for i in range(0, len(items), 8)])
            masks = self._latent_masks(items, latents.shape[-2:])
            buckets.append(_Bucket(latents, flipped, [ex.caption for ex in items], size,
                                   None if masks is None else masks.to(latents.device)))
        return buckets

    @staticmethod
    def _latent_masks(items: Sequence[Example], latent_size) -> Optional[torch.Tensor]:
        """Subject masks (dataset.TrainImage.mask) averaged down to latent pixels; None if no item has
        one, and all ones for an item without."""
        if not _has_masks(items):
            return None
        full = [torch.ones(ex.image.height, ex.image.width) if getattr(ex, "mask", None) is None
                else torch.from_numpy(np.asarray(ex.mask.convert("L"), np.float32) / 255.0) for ex in items]
        return torch.nn.functional.interpolate(torch.stack(full)[:, None], size=tuple(latent_size), mode="area")

    @torch.no_grad()
    def _cache_text(self, buckets: Sequence[_Bucket]) -> Dict[tuple, Cond]:
        cache: Dict[tuple, Cond] = {}
        dropped = [""] if self.config.caption_dropout else []
        for b in buckets:
            for caption in list(b.captions) + dropped:
                if (caption, b.size) not in cache:
                    cache[(caption, b.size)] = self.backend.encode_text([caption], size=b.size)
        return cache

    def _signature(self, n_trainable: int) -> dict:
        """What a checkpoint must share with the run that resumes it: the trained parameters, the
        model, and what each step draws and how its loss is made (objective_settings)."""
        c = self.config
        masked = _has_masks(self.instance)
        return {"mode": c.mode, "rank": c.rank, "alpha": c.alpha, "lora_conv": c.lora_conv,
                "lora_targets": c.lora_targets,
                "train_text_encoder": c.train_text_encoder, "seed": c.seed, "prior": c.prior,
                "masked_loss": masked,
                "n_trainable": n_trainable, "model": self.backend.fingerprint(), "flip": bool(self.flip),
                **objective_settings(c.to_dict(), masked, self.accelerator.num_processes)}

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        c, backend, acc = self.config, self.backend, self.accelerator
        self._phase("caching")
        inst_buckets = self._cache_images(self.instance, self.flip)
        class_buckets = self._cache_images(self.class_images, False) if self.class_images else []
        train_te = c.train_text_encoder
        text_cache = {} if train_te else self._cache_text(inst_buckets + class_buckets)
        self._release_frozen(train_te)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            named = self._trainable(train_te)
        params = [p for _, p in named]
        if c.gradient_checkpointing != "off":
            # "full" keeps the boolean call every backend knows; "attention" is passed as is, and a
            # backend that cannot checkpoint selectively treats it as full.
            backend.set_gradient_checkpointing(True if c.gradient_checkpointing == "full" else c.gradient_checkpointing)
        models = backend.trainable_models(True, train_te)
        wrapped = acc.prepare(*models) if models else []
        wrapped = list(wrapped) if isinstance(wrapped, (list, tuple)) else [wrapped]
        backend.use_wrapped(wrapped)
        for m in models:
            m.train()

        te_names = {n for n, _ in named if n.startswith("lora_te") or n.startswith("text_encoder")}
        lr = c.resolved_lr()
        groups = [{"params": [p for n, p in named if n not in te_names], "lr": lr}]
        if te_names:
            groups.append({"params": [p for n, p in named if n in te_names], "lr": c.text_encoder_lr or lr})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=c.weight_decay)
        schedule = lr_lambda(c.lr_scheduler, c.lr_warmup_steps, c.steps)

        start = 0
        ckpt_path = self.output_dir / CHECKPOINT_NAME
        if c.resume and ckpt_path.is_file():
            start = self._load_checkpoint(ckpt_path, named, optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=start - 1) if start else \
            torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        optimizer = acc.prepare(optimizer)

        self._phase("training")
        status = "completed"
        step = start
        t0, done_here = time.perf_counter(), 0
        cancel = self.callbacks.cancelled_by
        try:
            for step in range(start, c.steps):
                if self.callbacks.should_stop and self.callbacks.should_stop():
                    status = "cancelled"
                    break
                try:
                    parts = self._optimizer_step(step, inst_buckets, class_buckets, text_cache, models, params,
                                                 optimizer, scheduler, named)
                except cancel:  # raised before optimizer.step(): the weights are those of `step` steps
                    status = "cancelled"
                    break
                done_here += 1
                elapsed = time.perf_counter() - t0
                per_step = elapsed / done_here
                record = {"step": step + 1, "loss": parts[0], "instance_loss": parts[1], "prior_loss": parts[2],
                          "lr": scheduler.get_last_lr()[0]}
                self.history.append(record)
                if self.callbacks.on_step:
                    self.callbacks.on_step(StepInfo(step + 1, c.steps, parts[0], parts[1], parts[2], record["lr"],
                                                    per_step, per_step * (c.steps - step - 1)))
                if c.checkpoint_every and (step + 1) % c.checkpoint_every == 0 and step + 1 < c.steps:
                    self._save_checkpoint(ckpt_path, step + 1, named, optimizer)
                if c.sample_every and (step + 1) % c.sample_every == 0 and self.callbacks.on_preview:
                    try:
                        self._preview(step + 1)
                    except cancel:  # this step is finished: keep it
                        status, step = "cancelled", step + 1
                        break
            else:
                step = c.steps
        finally:
            backend.unwrap()
            if c.gradient_checkpointing != "off":
                backend.set_gradient_checkpointing(False)
            for m in models:
                m.eval()
            for p in params:
                p.requires_grad_(False)

        self._phase("saving")
        result = TrainResult(status=status, step=step, output_dir=self.output_dir, history=self.history,
                             network=self.network)
        if status == "cancelled":
            result.checkpoint_path = self._save_checkpoint(ckpt_path, step, named, optimizer)
            return result
        if acc.is_main_process:
            if c.checkpoint_every:
                result.checkpoint_path = self._save_checkpoint(ckpt_path, step, named, optimizer)
            self._save_outputs(result)
        acc.wait_for_everyone()
        return result

    def _release_frozen(self, train_te: bool) -> None:
        """After caching, a LoRA run without previews never touches the VAE again, nor the text
        encoders while they are frozen: let the backend drop them (their weights are most of
        what is resident besides the UNet). Only on request, and only where the backend can."""
        c = self.config
        if not (self.release_frozen and c.mode == "lora"):
            return
        if c.sample_every and self.callbacks.on_preview:
            return
        self.backend.release_encoders(vae=True, text_encoders=not train_te)

    def _trainable(self, train_te: bool) -> List[tuple]:
        c = self.config
        if c.mode == "lora":
            targets = select_lora_targets(self.backend.lora_targets(True, train_te, conv=c.lora_conv),
                                          c.lora_targets)
            self.network = LoRANetwork(targets, rank=c.rank, alpha=c.alpha)
            # A host may inject adapters its own way (ComfyUI: weight wrappers on a cloned patcher,
            # so the MODEL other nodes share is never touched); by default module forwards are wrapped.
            self.backend.attach_lora(self.network)
            named = []
            for name, adapter in self.network.adapters.items():
                named += [(f"{name}.lora_down.weight", adapter.lora_down.weight),
                          (f"{name}.lora_up.weight", adapter.lora_up.weight)]
            return named
        named = []
        for i, model in enumerate(self.backend.trainable_models(True, train_te)):
            model.to(torch.float32).requires_grad_(True)
            prefix = "unet" if i == 0 else f"text_encoder{i}"
            named += [(f"{prefix}.{n}", p) for n, p in model.named_parameters()]
        return named

    def _draw(self, step: int, micro: int, inst: List[_Bucket], cls: List[_Bucket]):
        """The global batch of this micro-step, then this process's slice of it, and the instance
        samples' loss weights (masked loss) or None."""
        c, acc = self.config, self.accelerator
        g = step_generator(c.seed, step, micro)
        world, rank, b = acc.num_processes, acc.process_index, c.batch_size
        total = world * b
        sizes = torch.tensor([len(x.captions) for x in inst], dtype=torch.float)
        bucket = inst[int(torch.multinomial(sizes, 1, generator=g))]
        idx = torch.randint(len(bucket.captions), (total,), generator=g)
        flips = torch.randint(2, (total,), generator=g) if bucket.flipped is not None else torch.zeros(total, dtype=torch.long)
        lat = _pick(flips, (bucket.flipped if bucket.flipped is not None else bucket.latents)[idx], bucket.latents[idx])
        noise = objective.sample_noise(lat.shape, g, c.offset_noise)
        t = torch.randint(0, len(self.backend.alphas_cumprod), (total,), generator=g)
        mine = slice(rank * b, (rank + 1) * b)
        parts = [(lat[mine], noise[mine], t[mine], [bucket.captions[i] for i in idx[mine].tolist()], bucket.size)]
        weight = None
        if bucket.masks is not None:
            masks = _pick(flips, bucket.masks.flip(-1)[idx], bucket.masks[idx])[mine]
            floor = c.mask_background_weight
            weight = (floor + (1 - floor) * masks).expand(-1, lat.shape[1], -1, -1)
        if cls:
            cb = cls[0]
            cidx = torch.randint(len(cb.captions), (total,), generator=g)
            clat = cb.latents[cidx]
            cnoise = objective.sample_noise(clat.shape, g, c.offset_noise)
            ct = torch.randint(0, len(self.backend.alphas_cumprod), (total,), generator=g)
            parts.append((clat[mine], cnoise[mine], ct[mine], [cb.captions[i] for i in cidx[mine].tolist()], cb.size))
        if c.caption_dropout:
            # drawn last, so that the batch is the one drawn without dropout but for its captions
            keep = (torch.rand(total, generator=g) >= c.caption_dropout)[mine].tolist()
            lat_i, noise_i, t_i, captions, size = parts[0]
            parts[0] = (lat_i, noise_i, t_i, [cap if k else "" for cap, k in zip(captions, keep)], size)
        return parts, weight

    def _cond(self, captions: List[str], size: tuple, text_cache: Dict[tuple, Cond]) -> Cond:
        if text_cache:
            return cat_conds([text_cache[(cap, size)] for cap in captions])
        return self.backend.encode_text(captions, size=size)

    def _forward_loss(self, parts, text_cache, instance_weight=None) -> objective.LossParts:
        c, backend = self.config, self.backend
        dev = backend.device
        batches = [objective.make_batch(lat.to(dev), noise.to(dev), t.to(dev), backend.alphas_cumprod,
                                        backend.prediction_type, c.min_snr_gamma) for lat, noise, t, _, _ in parts]
        conds = [self._cond(caps, size, text_cache) for _, _, _, caps, size in parts]
        n_inst = parts[0][0].shape[0]
        weight = instance_weight.to(dev) if instance_weight is not None else None
        # The instance bucket and the class images may differ in size (crop="bucket"): then a forward
        # pass and a loss for each part, as their latents cannot share a batch.
        apart = len(parts) > 1 and parts[0][0].shape[1:] != parts[1][0].shape[1:]
        with self.accelerator.autocast():
            if apart:
                preds = [backend.predict(b.noisy, b.timesteps, cd) for b, cd in zip(batches, conds)]
            else:
                merged = objective.NoisedBatch(*(torch.cat([getattr(b, f) for b in batches])
                                                 for f in ("noisy", "timesteps", "target", "weight")))
                pred = backend.predict(merged.noisy, merged.timesteps, cat_conds(conds))
        if apart:
            return objective.dreambooth_loss_by_part(preds, batches, c.prior_weight, weight)
        return objective.dreambooth_loss(pred, merged, n_inst, c.prior_weight, weight)

    def _optimizer_step(self, step, inst, cls, text_cache, models, params, optimizer, scheduler, named):
        c, acc = self.config, self.accelerator
        totals = np.zeros(3)
        for micro in range(c.gradient_accumulation):
            parts, weight = self._draw(step, micro, inst, cls)
            with _accumulate(acc, models):
                loss = self._forward_loss(parts, text_cache, weight)
                finite = torch.isfinite(loss.total.detach()).float()
                if acc.num_processes > 1:
                    finite = acc.reduce(finite.to(acc.device), "min")
                if not bool(finite):
                    path = self._save_checkpoint(self.output_dir / CHECKPOINT_NAME, step, named, optimizer)
                    raise TrainingDiverged(
                        f"the loss became {loss.total.item()} at step {step + 1}; training stopped and the last good "
                        f"state was kept in {path}. Lower the learning rate (now {c.resolved_lr():g}), use "
                        "bf16 instead of fp16, or enable min-SNR weighting, then resume.")
                acc.backward(loss.total)
                if acc.sync_gradients and c.max_grad_norm:
                    acc.clip_grad_norm_(params, c.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            totals += [loss.total.item(), loss.instance.item(), loss.prior.item() if loss.prior is not None else 0.0]
        scheduler.step()
        totals /= c.gradient_accumulation
        if acc.num_processes > 1:
            totals = acc.reduce(torch.tensor(totals, device=acc.device), "mean").cpu().numpy()
        return float(totals[0]), float(totals[1]), (float(totals[2]) if cls else None)

    def _preview(self, step: int) -> None:
        from ..backends.base import SampleSettings

        c = self.config
        prompts = c.sample_prompts or [c.resolved_instance_prompt()]
        res = c.resolution or self.backend.native_resolution
        images = self.backend.generate(prompts, [c.seed + i for i in range(len(prompts))],
                                       SampleSettings(width=res, height=res, negative_prompt=c.negative_prompt))
        self.callbacks.on_preview(step, images)

    # -- persistence -------------------------------------------------------------------------
    def _save_checkpoint(self, path: Path, step: int, named, optimizer) -> Optional[Path]:
        if not self.accelerator.is_main_process:
            return None
        tensors = {f"param.{n}": p.detach() for n, p in named}
        inner = getattr(optimizer, "optimizer", optimizer)
        opt_tensors, opt_meta = checkpoint.optimizer_tensors(inner)
        tensors.update(opt_tensors)
        meta = {"step": step, "signature": self._signature(len(named)), "optimizer": opt_meta,
                "history": self.history, "config": self.config.to_dict()}
        fileio.save_tensors(path, tensors, {"dreambooth_checkpoint": json.dumps(meta, default=str)})
        return path

    def _load_checkpoint(self, path: Path, named, optimizer) -> int:
        from safetensors import safe_open
        from safetensors.torch import load_file

        c = self.config
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("dreambooth_checkpoint", "{}"))
        saved = meta.get("config") or {}
        expected = self._signature(len(named))
        got = dict(meta.get("signature", {}))
        got.setdefault("lora_targets", "transformer")  # checkpoints from before the option had only that set
        got.setdefault("masked_loss", False)  # ... and from before masks
        if saved:  # ... and from before the objective's settings: their config tells them (same processes)
            for k, v in objective_settings(saved, got["masked_loss"], self.accelerator.num_processes).items():
                got.setdefault(k, v)
        for k in ("flip", *OBJECTIVE_SETTINGS):  # where nothing tells, taken as unchanged
            got.setdefault(k, expected[k])
        diff = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
        fresh_run = "start a fresh run (resume off, or another save name / output folder)"
        if diff:
            listed = "; ".join(f"{k}: {a} in the checkpoint, {b} now" for k, (a, b) in diff.items())
            raise CheckpointMismatch(
                f"{path} was saved with other settings ({listed}). They decide what is trained, so a resumed "
                f"run cannot change them: set {'it' if len(diff) == 1 else 'them'} back to resume, or {fresh_run}")
        start = int(meta["step"])
        if start > c.steps:
            raise CheckpointMismatch(f"{path} has trained {start} steps, more than steps={c.steps}: set steps to "
                                     f"{start} or more to continue from it, or {fresh_run}")
        tensors = load_file(str(path))
        with torch.no_grad():
            for n, p in named:
                p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
        fresh = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
        checkpoint.load_optimizer(optimizer, tensors, meta["optimizer"])
        self._take_current_rates(optimizer, fresh, saved, start)
        self.history = list(meta.get("history", []))
        return start

    def _take_current_rates(self, optimizer, fresh: List[tuple], saved: dict, start: int) -> None:
        """The restored optimizer holds the checkpoint run's learning rates and weight decay; the
        resumed run trains with the ones set now (a lower rate is the advice after a divergence), on
        the schedule of its own `steps` (LambdaLR scales each group's `initial_lr`). A changed value
        is said in a "resuming" phase line, with the learning rate it gives the next step."""
        c = self.config
        changes = [f"{k} {saved[k]} -> {getattr(c, k)}" for k in ("steps", "lr_scheduler", "lr_warmup_steps")
                   if k in saved and saved[k] != getattr(c, k)]
        factor = lr_lambda(c.lr_scheduler, c.lr_warmup_steps, c.steps)(start)
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
        if changes:
            now = optimizer.param_groups[0]["lr"]
            next_rate = f"learning rate at step {start + 1}: {now:g}" + (
                f"; the checkpoint's run would have used {was:g}" if not math.isclose(was, now) else "")
            self._phase(f"resuming at step {start} of {c.steps} with settings changed since the checkpoint, which "
                        f"apply from step {start + 1}: {', '.join(changes)} ({next_rate})")

    def _save_outputs(self, result: TrainResult) -> None:
        from .. import plots

        c = self.config
        out = self.output_dir
        if c.mode == "lora" and self.network is not None:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[c.save_precision]
            result.lora_path = save_lora(self.network, out / f"{safe_name(c.save_name)}.safetensors",
                                         lora_metadata(c, self.backend, result.step), dtype)
        else:
            result.full_paths = self.backend.save_full(str(out / safe_name(c.save_name)))
        fileio.write_json(out / "config.json", {"config": c.to_dict(), "base_model": self.backend.describe(),
                                                "version": __version__, "steps_done": result.step})
        fileio.write_json(out / "loss.json", self.history)
        plots.save_loss_curve(self.history, out / "loss.png")


# What each step draws and how its loss is made, beyond the signature's first fields: a resumed run
# with another value would continue a different training than its checkpoint's.
OBJECTIVE_SETTINGS = ("batch_size", "gradient_accumulation", "prior_weight", "min_snr_gamma", "offset_noise",
                      "caption_dropout", "mask_background_weight")


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


def _pick(choose_first: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per sample, `first` where `choose_first` (drawn on the CPU generator) is set, else `second`. The
    choice moves to the samples' device: backends cache latents on theirs (CUDA), and torch.where
    refuses a CPU condition against CUDA tensors."""
    return torch.where(choose_first.bool().view(-1, *(1,) * (first.ndim - 1)).to(first.device), first, second)


def _has_masks(items: Sequence[Example]) -> bool:
    """Whether any example carries a subject mask (dataset.TrainImage.mask): a masked loss."""
    return any(getattr(ex, "mask", None) is not None for ex in items)


def select_lora_targets(targets: Dict[str, torch.nn.Module], scope: str) -> Dict[str, torch.nn.Module]:
    """The backend's kohya-named targets narrowed to `scope` (config.LORA_TARGETS). Filtering by
    name here, not in each backend, gives every host the same set and the same file keys.
    "attention" drops proj_in/proj_out and the feed-forward (and the text encoder's MLP) but keeps
    what `lora_conv` added: it narrows the transformer blocks only."""
    if scope == "transformer":
        return dict(targets)
    if scope != "attention":
        raise ValueError(f"lora_targets {scope!r}: choose 'transformer' or 'attention'")
    in_transformer = re.compile(r"_attentions_\d+_|^lora_te\d?_")
    return {name: module for name, module in targets.items()
            if not in_transformer.search(name) or ATTENTION_PROJECTION.search(name)}


def train(backend: Backend, config: TrainConfig, instance: Sequence[Example],
          class_images: Optional[Sequence[Example]] = None, callbacks: Optional[Callbacks] = None,
          accelerator=None, flip: Optional[bool] = None, release_frozen: bool = False) -> TrainResult:
    return DreamBoothTrainer(backend, config, instance, class_images, callbacks, accelerator, flip,
                             release_frozen=release_frozen).run()
