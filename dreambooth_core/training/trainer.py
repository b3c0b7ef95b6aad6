"""The DreamBooth training loop, backend-agnostic, on accelerate.

Frozen parts are computed once (`cache`: VAE latents, and caption embeddings while the text
encoders are frozen); each step trains on the batch `draw` gives it; `checkpoint` saves and
resumes a run exactly.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Type

import numpy as np
import torch

from .. import __version__, fileio
from . import checkpoint, objective, out_of_memory
from .checkpoint import objective_settings
from .cache import Bucket, cache_images, cache_text, has_masks
from .draw import draw
from .optimizers import make_optimizer
from .out_of_memory import OOM_ERRORS, TrainingOutOfMemory
from ..fileio import safe_name
from ..backends.base import Backend, Cond, cat_conds
from ..config import TrainConfig
from ..adapters import LoRANetwork, save_lora
from ..adapters.kohya import select_lora_targets
from ..adapters.metadata import checkpoint_metadata, lora_metadata, thumbnail_uri

CHECKPOINT_NAME = "checkpoint.safetensors"


class TrainingDiverged(RuntimeError):
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
class RunState:
    """What the steps of a run work on (`DreamBoothTrainer._start` makes it): the cached instance and
    class latents, the cached caption embeddings, the trained parameters (named), the wrapped models,
    the optimizer, the LR schedule, and the step it starts from (a resumed run's)."""
    inst: List[Bucket]
    cls: List[Bucket]
    text_cache: Dict[tuple, Cond]
    named: List[tuple]
    params: List[torch.nn.Parameter]
    models: List[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start: int


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
        # How the model is trained (discrete ε/v or rectified flow); settings it cannot take are refused here.
        self.schedule = backend.schedule()
        objective.refuse_min_snr(self.schedule, self.config.min_snr_gamma)
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
        self._released = False
        self._last_preview: Optional[Tuple[int, List[np.ndarray]]] = None
        # Taken before any step changes the weights (full fine-tuning changes them in place).
        self.base_fingerprint = backend.base_fingerprint()

    # -- setup -------------------------------------------------------------------------------
    def _make_accelerator(self):
        from .accel import make_accelerator

        return make_accelerator(self.config, self.backend.device)

    def _phase(self, name: str) -> None:
        if self.callbacks.on_phase:
            self.callbacks.on_phase(name)

    def _signature(self, n_trainable: int) -> dict:
        """What a checkpoint must share with the run that resumes it: the trained parameters, the
        model, and what each step draws and how its loss is made (objective_settings)."""
        c = self.config
        masked = has_masks(self.instance)
        # A flow schedule's sampling and shift decide which noise levels train (a host may let the user
        # change the shift on the same weights); the discrete schedule is the model's own (its fingerprint).
        kind = self.schedule.kind
        schedule = {} if kind == "discrete" else {"schedule": objective.schedule_settings(self.schedule)}
        return {"mode": c.mode, "rank": c.rank, "alpha": c.alpha, "lora_conv": c.lora_conv,
                "lora_targets": c.lora_targets,
                "train_text_encoder": c.train_text_encoder, "seed": c.seed, "prior": c.prior,
                "masked_loss": masked,
                "n_trainable": n_trainable, "model": self.backend.fingerprint(), "flip": bool(self.flip),
                "optimizer": c.optimizer,
                **objective_settings(c.to_dict(), masked, self.accelerator.num_processes), **schedule}

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        c, acc = self.config, self.accelerator
        run = self._start()
        self._phase("training")
        status = "completed"
        step = run.start
        t0, done_here = time.perf_counter(), 0
        cancel = self.callbacks.cancelled_by
        ckpt_path = self.output_dir / CHECKPOINT_NAME
        try:
            for step in range(run.start, c.steps):
                if self.callbacks.should_stop and self.callbacks.should_stop():
                    status = "cancelled"
                    break
                try:
                    parts = self._optimizer_step(run, step)
                except cancel:  # raised before optimizer.step(): the weights are those of `step` steps
                    status = "cancelled"
                    break
                except OOM_ERRORS as exc:  # an allocation in the forward, backward or the optimizer's first state
                    raise self._out_of_memory(run, step) from exc
                done_here += 1
                elapsed = time.perf_counter() - t0
                per_step = elapsed / done_here
                record = {"step": step + 1, "loss": parts[0], "instance_loss": parts[1], "prior_loss": parts[2],
                          "lr": run.scheduler.get_last_lr()[0]}
                self.history.append(record)
                if self.callbacks.on_step:
                    self.callbacks.on_step(StepInfo(step + 1, c.steps, parts[0], parts[1], parts[2], record["lr"],
                                                    per_step, per_step * (c.steps - step - 1)))
                if c.checkpoint_every and (step + 1) % c.checkpoint_every == 0 and step + 1 < c.steps:
                    self._save_checkpoint(ckpt_path, step + 1, run.named, run.optimizer)
                if c.sample_every and (step + 1) % c.sample_every == 0 and self.callbacks.on_preview:
                    try:
                        self._preview(step + 1)
                    except cancel:  # this step is finished: keep it
                        status, step = "cancelled", step + 1
                        break
            else:
                step = c.steps
        finally:
            self._end(run)

        self._phase("saving")
        result = TrainResult(status=status, step=step, output_dir=self.output_dir, history=self.history,
                             network=self.network)
        if status == "cancelled":
            result.checkpoint_path = self._save_checkpoint(ckpt_path, step, run.named, run.optimizer)
            return result
        if acc.is_main_process:
            if c.checkpoint_every:
                result.checkpoint_path = self._save_checkpoint(ckpt_path, step, run.named, run.optimizer)
            self._save_outputs(result)
        acc.wait_for_everyone()
        return result

    def _start(self) -> "RunState":
        """Everything before the first step: cache latents and embeddings, attach the trained
        parameters, wrap the models, make the optimizer and LR schedule, resume from a checkpoint."""
        c, backend, acc = self.config, self.backend, self.accelerator
        self._phase("caching")
        inst_buckets = cache_images(self.backend, self.instance, self.flip)
        class_buckets = cache_images(self.backend, self.class_images, False) if self.class_images else []
        train_te = c.train_text_encoder
        text_cache = {} if train_te else cache_text(self.backend, inst_buckets + class_buckets, bool(c.caption_dropout))
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
        optimizer = make_optimizer(c.optimizer, [g for g in groups if g["params"]], c.weight_decay)
        schedule = lr_lambda(c.lr_scheduler, c.lr_warmup_steps, c.steps)

        start = 0
        ckpt_path = self.output_dir / CHECKPOINT_NAME
        if c.resume and ckpt_path.is_file():
            start = self._load_checkpoint(ckpt_path, named, optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=start - 1) if start else \
            torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        optimizer = acc.prepare(optimizer)
        return RunState(inst_buckets, class_buckets, text_cache, named, params, models, optimizer, scheduler, start)

    def _end(self, run: "RunState") -> None:
        """The backend's models as they were before the run: unwrapped, not checkpointing, in eval
        mode, their trained parameters frozen again."""
        c, backend = self.config, self.backend
        backend.unwrap()
        if c.gradient_checkpointing != "off":
            backend.set_gradient_checkpointing(False)
        for m in run.models:
            m.eval()
        for p in run.params:
            p.requires_grad_(False)

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
        self._released = True

    def _trainable(self, train_te: bool) -> List[tuple]:
        c = self.config
        if c.mode == "lora":
            targets = select_lora_targets(self.backend.lora_targets(True, train_te, conv=c.lora_conv),
                                          c.lora_targets)
            self.network = LoRANetwork(targets, rank=c.rank, alpha=c.alpha)
            # A host may inject adapters its own way (ComfyUI: weight wrappers on a cloned patcher,
            # so the MODEL other nodes share is never touched); by default module forwards are wrapped.
            self.backend.attach_lora(self.network)
            return [(f"{name}.{suffix}", p) for name, adapter in self.network.adapters.items()
                    for suffix, p in adapter.named_parameters()]
        named = []
        for i, model in enumerate(self.backend.trainable_models(True, train_te)):
            model.to(torch.float32).requires_grad_(True)
            prefix = "unet" if i == 0 else f"text_encoder{i}"
            named += [(f"{prefix}.{n}", p) for n, p in model.named_parameters()]
        return named

    def _draw(self, step: int, micro: int, inst: List[Bucket], cls: List[Bucket]):
        acc = self.accelerator
        return draw(self.config, self.schedule, step, micro, inst, cls,
                    processes=acc.num_processes, rank=acc.process_index)

    def _cond(self, captions: List[str], size: tuple, text_cache: Dict[tuple, Cond]) -> Cond:
        if text_cache:
            return cat_conds([text_cache[(cap, size)] for cap in captions])
        return self.backend.encode_text(captions, size=size)

    def _forward_loss(self, parts, text_cache, instance_weight=None) -> objective.LossParts:
        c, backend = self.config, self.backend
        dev = backend.device
        batches = [self.schedule.noised(lat.to(dev), noise.to(dev), t.to(dev), c.min_snr_gamma)
                   for lat, noise, t, _, _ in parts]
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

    def _optimizer_step(self, run: "RunState", step: int) -> Tuple[float, float, Optional[float]]:
        """One optimizer step (its micro-steps, then the LR schedule's step); returns its mean total,
        instance and prior losses, read back to the host."""
        c, acc = self.config, self.accelerator
        totals = np.zeros(3)
        for micro in range(c.gradient_accumulation):
            loss = self._micro_step(run, step, micro, functools.partial(self._stop_if_diverged, run, step))
            totals += [loss.total.item(), loss.instance.item(), loss.prior.item() if loss.prior is not None else 0.0]
        run.scheduler.step()
        totals /= c.gradient_accumulation
        if acc.num_processes > 1:
            totals = acc.reduce(torch.tensor(totals, device=acc.device), "mean").cpu().numpy()
        return float(totals[0]), float(totals[1]), (float(totals[2]) if run.cls else None)

    def _micro_step(self, run: "RunState", step: int, micro: int,
                    guard: Callable[[objective.LossParts, torch.Tensor], None]) -> objective.LossParts:
        """The device part of one micro-step: draw the batch, forward and loss, the NaN guard,
        backward, clipping, the optimizer's step. Nothing here reads a value back to the host but
        `guard` (given the loss and a 0-dim "all finite" flag on the device; it raises to stop
        before the weights change), so the whole of it runs on tensors that only claim a device."""
        c, acc = self.config, self.accelerator
        parts, weight = self._draw(step, micro, run.inst, run.cls)
        with _accumulate(acc, run.models):
            if c.prior_pass == "separate" and len(parts) > 1:
                loss = self._backward_by_part(parts, run.text_cache, weight, guard)
            else:
                loss = self._forward_loss(parts, run.text_cache, weight)
                guard(loss, self._finite(loss.total))
                acc.backward(loss.total)
            if acc.sync_gradients and c.max_grad_norm:
                acc.clip_grad_norm_(run.params, c.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        return loss

    def _backward_by_part(self, parts, text_cache, weight, guard) -> objective.LossParts:
        """prior_pass="separate": the instance part's forward and backward, then the class part's, so the
        activations of one part only are alive at a time. The gradient is the joint pass's, summed
        from L_instance and λ·L_class (eq. 2); the guard sees each loss before its backward."""
        c, acc = self.config, self.accelerator
        inst = self._forward_loss(parts[:1], text_cache, weight)
        guard(inst, self._finite(inst.total))
        acc.backward(inst.total)
        prior = self._forward_loss(parts[1:], text_cache).total  # the class part alone: its mean loss
        loss = objective.LossParts(inst.total.detach() + c.prior_weight * prior.detach(), inst.instance,
                                   prior.detach())
        guard(loss, self._finite(loss.total))
        acc.backward(c.prior_weight * prior)
        return loss

    def _finite(self, total: torch.Tensor) -> torch.Tensor:
        """A 0-dim "all finite" flag on the device (every process's, when there are several)."""
        acc = self.accelerator
        finite = torch.isfinite(total.detach()).float()
        return acc.reduce(finite.to(acc.device), "min") if acc.num_processes > 1 else finite

    def _out_of_memory(self, run: "RunState", step: int) -> TrainingOutOfMemory:
        """The step did not fit: drop its gradients, keep the last finished step, say what to change."""
        run.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        path = self._save_checkpoint(self.output_dir / CHECKPOINT_NAME, step, run.named, run.optimizer) if step else None
        return TrainingOutOfMemory(out_of_memory.message(self.config, bool(run.cls), step, path))

    def _stop_if_diverged(self, run: "RunState", step: int, loss: objective.LossParts, finite: torch.Tensor) -> None:
        """The NaN guard: a non-finite loss keeps the last good state and stops the run."""
        if not bool(finite):
            c = self.config
            path = self._save_checkpoint(self.output_dir / CHECKPOINT_NAME, step, run.named, run.optimizer)
            min_snr = ", or enable min-SNR weighting" if self.schedule.kind == "discrete" else ""
            raise TrainingDiverged(
                f"the loss became {loss.total.item()} at step {step + 1}; training stopped and the last good "
                f"state was kept in {path}. Lower the learning rate (now {c.resolved_lr():g}), use "
                f"bf16 instead of fp16{min_snr}, then resume.")

    def _preview(self, step: int) -> None:
        from ..backends.base import SampleSettings

        c = self.config
        prompts = c.sample_prompts or [c.resolved_instance_prompt()]
        res = c.resolution or self.backend.native_resolution
        images = self.backend.generate(prompts, [c.seed + i for i in range(len(prompts))],
                                       SampleSettings(width=res, height=res, negative_prompt=c.negative_prompt))
        self._last_preview = (step, images)
        self.callbacks.on_preview(step, images)

    def _thumbnail(self, step: int) -> Tuple[str, str]:
        """The file's preview of the subject (data URI, what it shows): a sample of the instance prompt
        made with the trained weights (the last preview where one was made at this step), or the first
        instance photo where the backend cannot sample now (encoders released, no VAE), Cancel came or
        `thumbnail_steps` is 0."""
        from ..backends.base import SampleSettings

        c = self.config
        if self._last_preview and self._last_preview[0] == step and not c.sample_prompts:
            return thumbnail_uri(self._last_preview[1][0]), "sample"
        if not self._released and c.thumbnail_steps > 0:
            res = c.resolution or self.backend.native_resolution
            try:
                # the run's class-image sampler and guidance: names the host's sampler knows (the WebUI's differ)
                image = self.backend.generate([c.resolved_instance_prompt()], [c.seed], SampleSettings(
                    steps=c.thumbnail_steps, guidance=c.class_guidance, sampler=c.class_sampler, width=res,
                    height=res, negative_prompt=c.negative_prompt))[0]
                return thumbnail_uri(image), "sample"
            except (ValueError, RuntimeError, NotImplementedError, *self.callbacks.cancelled_by) as exc:
                self._phase(f"thumbnail: sampling failed ({exc}); the file shows the first instance photo")
        return thumbnail_uri(self.instance[0].image), "instance image"

    def _metadata(self, step: int) -> dict:
        """What the saved file says beyond the config: the photos, the base and the preview."""
        thumbnail, source = self._thumbnail(step)
        return {"images": len(self.instance), "base_fingerprint": self.base_fingerprint,
                "thumbnail": thumbnail, "thumbnail_source": source}

    # -- persistence -------------------------------------------------------------------------
    def _save_checkpoint(self, path: Path, step: int, named, optimizer) -> Optional[Path]:
        if not self.accelerator.is_main_process:
            return None
        return checkpoint.save(path, step=step, named=named, optimizer=optimizer,
                               signature=self._signature(len(named)), history=self.history,
                               config=self.config.to_dict())

    def _load_checkpoint(self, path: Path, named, optimizer) -> int:
        c = self.config
        meta = checkpoint.read_meta(path)
        start = checkpoint.check_resumable(path, meta, self._signature(len(named)), c.steps,
                                           self.accelerator.num_processes)
        fresh = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
        checkpoint.restore(path, meta, named, optimizer)
        factor = lr_lambda(c.lr_scheduler, c.lr_warmup_steps, c.steps)(start)
        message = checkpoint.take_current_rates(optimizer, fresh, meta.get("config") or {}, c, start, factor)
        if message:
            self._phase(message)
        self.history = list(meta.get("history", []))
        return start

    def _save_outputs(self, result: TrainResult) -> None:
        from .. import plots

        c = self.config
        out = self.output_dir
        if c.mode == "lora" and self.network is not None:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[c.save_precision]
            result.lora_path = save_lora(self.network, out / f"{safe_name(c.save_name)}.safetensors",
                                         lora_metadata(c, self.backend, result.step, **self._metadata(result.step)),
                                         dtype)
        else:
            result.full_paths = self.backend.save_full(
                str(out / safe_name(c.save_name)),
                metadata=checkpoint_metadata(c, self.backend, result.step, **self._metadata(result.step)))
        fileio.write_json(out / "config.json", {"config": c.to_dict(), "base_model": self.backend.describe(),
                                                "version": __version__, "steps_done": result.step})
        fileio.write_json(out / "loss.json", self.history)
        plots.save_loss_curve(self.history, out / "loss.png")


def train(backend: Backend, config: TrainConfig, instance: Sequence[Example],
          class_images: Optional[Sequence[Example]] = None, callbacks: Optional[Callbacks] = None,
          accelerator=None, flip: Optional[bool] = None, release_frozen: bool = False) -> TrainResult:
    return DreamBoothTrainer(backend, config, instance, class_images, callbacks, accelerator, flip,
                             release_frozen=release_frozen).run()
