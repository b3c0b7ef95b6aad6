"""DreamBooth training as a background job of the WebUI: one at a time, status, cancel.

A request is checked before the job starts (so bad input is an immediate error: an empty or
unreadable dataset, an identifier that splits, a save name with folders); the job then runs in a
thread holding the WebUI's queue lock (txt2img waits while the shared model carries training
adapters; the server keeps answering) and runs the core's job (dreambooth_core.job: class images
through the core's cache, training, the LoRA copied into the WebUI's Lora folder) with the WebUI
as its host (`_JobHost`).
"""
from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from dreambooth_core.fileio import ALLOW_ANY_PATH_ENV, any_path_allowed, inside
from dreambooth_core.job import Host, check_job, prepare_instance_images, run_job
from dreambooth_core.training.accel import mixed_precision_for

from .backend import Interrupted

log = logging.getLogger("dreambooth")
#: request keys that are not TrainConfig fields
EXTRA_KEYS = ("instance_images", "force_token")
HISTORY_KEPT = 500


def data_dir() -> Path:
    from modules import paths_internal

    return Path(paths_internal.data_path)


def lora_dir() -> Path:
    from modules import paths_internal, shared

    return Path(getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths_internal.models_path, "Lora"))


def checkpoint_dir() -> Path:
    from modules import paths_internal, shared

    default = os.path.join(paths_internal.models_path, "Stable-diffusion")
    return Path(getattr(shared.cmd_opts, "ckpt_dir", None) or default)


def run_dir(stem: str) -> Path:
    return data_dir() / "outputs" / "dreambooth" / stem


def class_image_root() -> Path:
    return data_dir() / "outputs" / "dreambooth_class_images"


@dataclass
class Job:
    id: str
    config: Any  # TrainConfig
    state: str = "queued"  # queued | class_images | training | saving | completed | cancelled | error
    message: str = ""
    error: Optional[str] = None
    step: int = 0
    total: int = 0
    loss: Optional[float] = None
    prior_loss: Optional[float] = None
    eta_seconds: Optional[float] = None
    class_done: int = 0
    class_total: int = 0
    class_images: Dict[str, Any] = field(default_factory=dict)
    history: List[dict] = field(default_factory=list)
    previews: List[str] = field(default_factory=list)
    lora_path: Optional[str] = None
    checkpoint_path: Optional[str] = None
    full_paths: List[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: Optional[float] = None
    cancel_event: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return self.finished is None

    def should_stop(self) -> bool:
        from modules import shared

        return self.cancel_event.is_set() or bool(shared.state.interrupted)

    def status(self) -> dict:
        c = self.config
        name = Path(self.lora_path).stem if self.lora_path else None
        return {
            "id": self.id, "state": self.state, "running": self.running, "message": self.message, "error": self.error,
            "step": self.step, "total": self.total, "progress": self.step / self.total if self.total else 0.0,
            "loss": self.loss, "prior_loss": self.prior_loss, "eta_seconds": self.eta_seconds,
            "class_images_done": self.class_done, "class_images_total": self.class_total,
            "class_images": self.class_images, "history": self.history[-HISTORY_KEPT:], "previews": self.previews,
            "lora_path": self.lora_path, "lora_name": name,
            "prompt_example": f"<lora:{name}:1> {c.resolved_instance_prompt()}" if name else None,
            "checkpoint_path": self.checkpoint_path, "full_paths": self.full_paths,
            "output_dir": str(c.output_dir), "save_name": c.save_name, "mode": c.mode,
            "elapsed_seconds": (self.finished or time.time()) - self.started,
        }


_lock = threading.Lock()
_jobs: Dict[str, Job] = {}
_current: Optional[Job] = None


def _decode_images(items: List[Any]) -> list:
    """Uploaded images: base64 strings (a data: URL prefix is allowed) from the API; file paths
    (Path objects) or PIL images from the tab."""
    from PIL import Image

    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            out.append(item)
            continue
        data = item.split(",", 1)[1] if item.startswith("data:") else item
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data)))
        except Exception as exc:
            raise ValueError(f"instance_images[{i}]: not a base64-encoded image ({exc})") from None
        try:  # decoded now: a cut-off upload is the request's fault, named here, not a failed job later
            image.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"instance_images[{i}]: the image data is incomplete or corrupt ({exc}); send the "
                             "whole file again") from None
        out.append(image)
    return out


def _confined(value: str, name: str) -> str:
    """A folder a request names, resolved (links and '..' included), if it lies in the WebUI's data
    folder: a WebUI started with --listen is often shared, and a request must not read the machine's
    files. The server's owner may allow any folder with DREAMBOOTH_ALLOW_ANY_PATH=1."""
    path = os.path.realpath(os.path.expanduser(str(value)))
    root = os.path.realpath(data_dir())
    if not any_path_allowed() and not inside(path, root):
        raise ValueError(f"{name}: {value} is outside the WebUI's folder {root}, so it is refused (a shared WebUI "
                         f"must not expose the machine's files). Put the images in a folder under it, or upload "
                         f"them as instance_images; if you own this server, start it with {ALLOW_ANY_PATH_ENV}=1 "
                         "to allow any folder.")
    return path


def _config(request: Dict[str, Any]):
    from dreambooth_core.config import ConfigError, TrainConfig
    from dreambooth_core.fileio import safe_name

    from .backend import DEFAULT_SAMPLER

    settings = {k: v for k, v in request.items() if k not in EXTRA_KEYS and v is not None}
    for owned in ("output_dir", "model"):
        if owned in settings:
            raise ValueError(f"{owned}: set by the WebUI extension, not by the request")
    if "concepts" in settings:  # each concept names folders: not offered here until they are confined too
        raise ValueError("concepts: several subjects in one run are not offered by the WebUI's API; send one "
                         "subject per job, or train them together with ComfyUI's chained Dataset nodes or the "
                         "command line's --concepts")
    settings.setdefault("class_sampler", DEFAULT_SAMPLER)
    settings.setdefault("class_guidance", 7.0)
    settings.setdefault("save_name", "dreambooth")
    try:
        config = TrainConfig.from_mapping(settings, source="request")
        config.save_name = safe_name(str(config.save_name).strip())
    except (ConfigError, TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    config.output_dir = str(run_dir(config.save_name))
    return config


def apply_class_sampling(config, request: Dict[str, Any], backend) -> None:
    """The loaded family's class-image sampling where the request leaves it open: a backend's
    `class_sampling` (Forge's Flux: CFG 1 beside its distilled guidance, Euler with the Simple schedule,
    as Forge's own Flux preset) replaces the WebUI defaults that suit SD."""
    for key, value in getattr(backend, "class_sampling", {}).items():
        if request.get(key) is None:
            setattr(config, key, value)


def start(request: Dict[str, Any]) -> Job:
    """Check a training request and start it in the background; ValueError names the bad input."""
    global _current
    from dreambooth_core.dataset.tokens import TokenError
    from modules import sd_samplers

    from .loaded import make_backend

    config = _config(request)
    images = request.get("instance_images") or None
    if not images and not config.instance_dir:
        raise ValueError("instance_dir: give the folder with 3-30 photos of the subject (or upload instance_images)")
    if images is None:
        config.instance_dir = _confined(config.instance_dir, "instance_dir")
        if not Path(config.instance_dir).is_dir():
            raise ValueError(f"instance_dir: {config.instance_dir} is not a folder on the WebUI's machine")
    if config.class_dir:
        config.class_dir = _confined(config.class_dir, "class_dir")
    if config.prior and sd_samplers.find_sampler_config(config.class_sampler.partition(":")[0]) is None:
        raise ValueError(f"class_sampler: {config.class_sampler!r} is not one of the WebUI's samplers")
    with _lock:
        if _current is not None and _current.running:
            raise RuntimeError(f"a DreamBooth job is already running ({_current.id}); cancel it or wait for it")
        backend = make_backend(mode=config.mode, train_text_encoder=config.train_text_encoder)
        apply_class_sampling(config, request, backend)
        config.model = backend.describe()
        config.mixed_precision = mixed_precision_for(config.mixed_precision, backend.weight_dtype, backend.device)
        host = _JobHost()
        try:
            check = check_job(config, host, tokenizers=backend.tokenizers(),
                              native_resolution=backend.native_resolution, force_token=bool(request.get("force_token")))
        except TokenError as exc:
            raise ValueError(f"token: {exc}") from None
        data = prepare_instance_images(config, _decode_images(images) if images else None)
        job = Job(id=uuid.uuid4().hex[:12], config=config, total=config.steps,
                  message=f"{check.message} {data.summary()}")
        host.job = job
        _jobs[job.id] = job
        _current = job
    threading.Thread(target=_run, args=(job, host, backend, data), name=f"dreambooth-{job.id}", daemon=True).start()
    return job


def get(job_id: Optional[str] = None) -> Optional[Job]:
    """A job by id; without an id the current (or last) job."""
    return _jobs.get(job_id) if job_id else _current


def cancel(job_id: Optional[str] = None) -> Job:
    """Stop a job at its next step (mid-image while class images are generated); the trainer keeps a
    resumable checkpoint."""
    from modules import shared

    job = get(job_id)
    if job is None:
        raise KeyError(f"job {job_id!r}: no such DreamBooth job" if job_id else "no DreamBooth job has run yet")
    if job.running:
        job.cancel_event.set()
        if job.state in ("class_images", "training"):  # the job holds the queue lock: only it samples now
            shared.state.interrupt()
    return job


def _run(job: Job, host, backend, data) -> None:
    from modules import shared
    from modules.call_queue import queue_lock

    with queue_lock:
        shared.state.begin(job="dreambooth")
        optimized = bool(getattr(shared.opts, "training_xattention_optimizations", False))
        try:
            if job.cancel_event.is_set():
                job.state = "cancelled"
                return
            # The LoRAs of the last prompt released, the host's attention set for training (the backend
            # knows how: A1111's sd_hijack, or Forge's LoRA loader and memory manager).
            backend.begin_job(optimized)
            try:
                result = run_job(backend, job.config, data, host)
            except Exception as exc:
                if job.state == "class_images" and type(exc).__name__ == "NansException":
                    raise _class_images_nan(job.config, exc) from exc  # modules.devices.NansException
                raise
            job.history = result.history
            if result.class_images is not None:
                made = result.class_images
                job.class_images = {"generated": made.generated, "reused": made.reused, "count": made.count,
                                    "folder": str(made.folder)}
            if result.status == "cancelled" and result.phase == "class_images":
                job.state, job.message = "cancelled", "cancelled while generating class images (kept in the cache)"
            elif result.status == "cancelled":
                job.state = "cancelled"
                job.checkpoint_path = str(result.checkpoint_path) if result.checkpoint_path else None
                job.message = f"cancelled at step {result.step}; start again with resume on to continue"
            else:
                _report(job, result)
                job.state = "completed"
        except Exception as exc:  # reported through the status route
            log.exception("DreamBooth job %s failed", job.id)
            job.state, job.error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            try:
                backend.release()
            finally:
                backend.end_job(optimized)
                shared.state.end()
                job.finished = time.time()
    log.info("DreamBooth job %s: %s %s", job.id, job.state, job.error or job.message)


def _class_images_nan(config, exc: Exception) -> RuntimeError:
    return RuntimeError(
        f"class images: the WebUI's txt2img produced NaN for {config.resolved_class_prompt()!r} before any training "
        f"({exc}). The class images made so far are kept. Generate one image with that prompt in txt2img to "
        "check the checkpoint; if it fails there too, follow the WebUI's advice above, or set Settings > "
        "Stable Diffusion > Emphasis mode to 'No norm' (the default divides by the mean of the text encoder's "
        "output, which some merged or custom checkpoints have near zero).")


class _JobHost(Host):
    """The WebUI as the host of a core job (dreambooth_core.job): class images in its outputs folder
    through its txt2img (one at a time), the LoRA in its Lora folder (its LoRA support lists it and
    `<lora:NAME:1>` works), a full fine-tune in its checkpoint folder with the loaded model's .yaml;
    progress and Cancel through the Job and the WebUI's shared state."""

    class_batch_size = 1
    cancelled_by = (Interrupted,)
    job: Optional[Job] = None

    def class_image_root(self) -> Path:
        return class_image_root()

    def lora_destination(self, save_name: str) -> Path:
        return lora_dir() / f"{save_name}.safetensors"

    def checkpoint_destination(self, source: Path) -> Path:
        return checkpoint_dir() / source.name

    def published(self, path: Path, kind: str) -> None:
        if kind == "checkpoint":
            _copy_model_yaml(path)

    def should_stop(self) -> bool:
        return self.job.should_stop()

    def phase(self, name: str) -> None:
        self.job.state = {"publishing": "saving"}.get(name, name)
        if name == "class_images":
            self.job.class_total = self.job.config.num_class_images

    def class_progress(self, done: int, total: int) -> None:
        self.job.class_done, self.job.class_total = done, total

    def callbacks(self):
        callbacks = super().callbacks()
        callbacks.on_step = lambda info: _on_step(self.job, info)
        callbacks.on_preview = lambda step, images: _on_preview(self.job, step, images)
        callbacks.on_phase = lambda phase: log.info("DreamBooth %s: %s", self.job.id, phase)
        return callbacks


def _report(job: Job, result) -> None:
    """What the finished job says and where its files are."""
    c = job.config
    if c.mode == "lora" and result.lora_path:
        job.lora_path = str(result.lora_path)
        job.message = f"{result.step} steps; LoRA saved: use <lora:{c.save_name}:1> in a prompt"
    job.full_paths = list(result.full_paths)
    if job.full_paths:
        job.message = f"{result.step} steps; checkpoint saved as {Path(job.full_paths[-1]).name} (refresh the checkpoint list)"
    if c.checkpoint_every and result.checkpoint_path:
        job.checkpoint_path = str(result.checkpoint_path)


def _on_step(job: Job, info) -> None:
    from modules import shared

    job.step, job.total, job.loss, job.prior_loss, job.eta_seconds = (info.step, info.total, info.loss,
                                                                      info.prior_loss, info.eta_seconds)
    job.history.append({"step": info.step, "loss": info.loss, "prior_loss": info.prior_loss, "lr": info.lr})
    shared.state.textinfo = f"DreamBooth step {info.step}/{info.total}, loss {info.loss:.4f}"


def _on_preview(job: Job, step: int, images) -> None:
    from dreambooth_core.fileio import save_image

    folder = Path(job.config.output_dir) / "previews"
    paths = []
    for i, image in enumerate(images):
        path = folder / f"step{step:06d}_{i}.png"
        save_image(path, image)
        paths.append(str(path))
    job.previews = paths


def _copy_model_yaml(dest: Path) -> None:
    from modules import shared

    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    yaml = Path(info.filename).with_suffix(".yaml") if info is not None else None
    if yaml is not None and yaml.is_file():
        shutil.copyfile(yaml, dest.with_suffix(".yaml"))
