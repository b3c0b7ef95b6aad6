"""One DreamBooth run, whatever the host: settings and instance photos in; class images, training
and the published LoRA (or checkpoint) out.

The command line, the ComfyUI Train node and the WebUI job differ only in where files go and how
progress, Cancel and previews reach the user. Each says that in a `Host` and calls `check_job`,
then `run_job`: the checks made before any work, the order of the steps and what is kept on Cancel
are written here once.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from . import fileio
from .config import TrainConfig

DEFAULT_INSTANCE_TEMPLATE = "a photo of {token} {class}"
DEFAULT_CACHE = Path(os.environ.get("DREAMBOOTH_CACHE", Path.home() / ".cache" / "dreambooth")) / "class_images"


class Host:
    """What a host decides for a run. The defaults are a plain process's: class images in the user's
    cache, the LoRA left in the run folder, no progress shown, never cancelled."""

    #: images per sampling call while class images are made
    class_batch_size: int = 4
    #: exceptions that mean Cancel, raised from inside the model or the sampler (e.g. ComfyUI's interrupt)
    cancelled_by: tuple = ()

    def class_image_root(self) -> Path:
        """Where generated class images are cached (reused by every later run of that class)."""
        return DEFAULT_CACHE

    def lora_destination(self, save_name: str) -> Optional[Path]:
        """Where the finished LoRA is published (the host's LoRA folder); None: it stays in the run folder."""
        return None

    def checkpoint_destination(self, source: Path) -> Optional[Path]:
        """Where a full fine-tune's checkpoint file is published; None: it stays in the run folder."""
        return None

    def published(self, path: Path, kind: str) -> None:
        """Called after a file was published; kind "lora" or "checkpoint" (e.g. to place the loaded
        model's .yaml beside a checkpoint)."""

    def accelerator(self, config: TrainConfig, device):
        """The run's Accelerator; hosts are long-lived processes, so accelerate's state is reset."""
        from .training.accel import make_accelerator

        return make_accelerator(config, device, reset=True)

    def should_stop(self) -> bool:
        """Polled between class-image batches and between training steps: True asks the run to stop."""
        return False

    def phase(self, name: str) -> None:
        """The run entered "class_images", "training" or "publishing"."""

    def class_progress(self, done: int, total: int) -> None:
        """Class images made so far."""

    def callbacks(self):
        """The training callbacks; asked for once, when training starts. Override to add progress and
        previews; keep `should_stop` and `cancelled_by` the host's."""
        from .training.trainer import Callbacks

        return Callbacks(should_stop=self.should_stop, cancelled_by=tuple(self.cancelled_by))


@dataclass
class JobResult:
    status: str  # "completed" | "cancelled"
    phase: str  # where the run ended: "class_images" | "training" | "published"
    step: int = 0
    history: List[dict] = field(default_factory=list)
    lora_path: Optional[Path] = None  # published (or the run folder's, where the host keeps it there)
    full_paths: List[str] = field(default_factory=list)
    checkpoint_path: Optional[Path] = None
    class_images: Any = None  # prior.ClassImageSet of generated class images
    class_note: str = ""
    training: Any = None  # trainer.TrainResult


def check_job(config: TrainConfig, host: Host, *, tokenizers=None, native_resolution: Optional[int] = None,
              force_token: bool = False):
    """Everything that can be refused before any work: the settings, a save name with folders, a
    published LoRA that a run of another name would overwrite, an optimizer whose library is
    missing, an identifier that the tokenizer splits (unless forced). Fills the resolution in from the model's. Returns the token check
    (None without tokenizers)."""
    from .adapters import check_replaceable
    from .dataset.tokens import require_single_token
    from .fileio import safe_name
    from .training.optimizers import check_available

    config.save_name = safe_name(str(config.save_name).strip())
    if config.resolution is None and native_resolution:
        config.resolution = int(native_resolution)
    config.validate()
    check_available(config.optimizer)
    if config.mode == "lora":
        dest = host.lora_destination(config.save_name)
        if dest is not None:
            check_replaceable(dest)
    if tokenizers is None:
        return None
    return require_single_token(tokenizers, config.token, force=force_token)


def prepare_instance_images(config: TrainConfig, source: Any = None):
    """The subject's photos (a folder, files or in-memory images; default `config.instance_dir`)
    prepared with the run's caption template, resolution, crop, flip and masks."""
    from .dataset import prepare_dataset

    source = config.instance_dir if source is None else source
    if source is None or (isinstance(source, (str, os.PathLike)) and not str(source)):
        raise ValueError("instance_dir: give the folder with 3-30 photos of your subject")
    return prepare_dataset(source, token=config.token, class_noun=config.class_noun,
                           caption_template=config.instance_prompt or DEFAULT_INSTANCE_TEMPLATE,
                           resolution=config.resolution, crop=config.crop, flip=config.flip, seed=config.seed,
                           masks="alpha" if config.masked_loss else None)


def class_images(backend, config: TrainConfig, host: Host, resolution: int, should_stop=None):
    """The class images: the user's own if `config.class_dir` holds images, else generated through
    the backend and cached (only the missing ones are made). Returns (items or None when stopped,
    a one-line note, the generated set or None)."""
    from .backends.base import SampleSettings
    from .dataset import IMAGE_EXTS
    from .class_images.cache import ensure_class_images, load_class_folder

    prompt = config.resolved_class_prompt()
    folder = Path(config.class_dir) if config.class_dir else None
    if folder and folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir()):
        data = load_class_folder(folder, resolution=resolution, class_prompt=prompt)
        return data.items, f"{len(data.items)} class images from {folder}", None
    settings = SampleSettings(steps=config.class_steps, guidance=config.class_guidance, sampler=config.class_sampler,
                              negative_prompt=config.negative_prompt, width=resolution, height=resolution)
    made = ensure_class_images(backend, folder or host.class_image_root(), prompt, config.num_class_images, settings,
                               seed=config.seed, batch_size=host.class_batch_size, progress=host.class_progress,
                               should_stop=should_stop)
    if not made.complete:
        note = (f"class-image generation stopped after {len(made.paths)} of {made.count} (kept in {made.folder}; "
                "the next run reuses them)")
        return None, note, made
    note = (f"{len(made.paths)} class images for '{prompt}' ({made.reused} cached, {made.generated} new) "
            f"in {made.folder}")
    return made.load(resolution=resolution).items, note, made


def run_job(backend, config: TrainConfig, data, host: Host, *, class_items: Optional[Sequence] = None,
            release_frozen: bool = False, log=None) -> JobResult:
    """Class images (unless given), training, publishing. Cancel, in either phase, returns a
    "cancelled" result and keeps what was made: class images in their cache, training as a
    checkpoint of its last finished step."""
    import torch

    from .training.objective import refuse_min_snr
    from .training.trainer import train

    refuse_min_snr(backend.schedule(), config.min_snr_gamma)  # before the class images, not after them
    resolution = config.resolution or backend.native_resolution
    accelerator = host.accelerator(config, backend.device)
    main = accelerator.is_main_process
    result = JobResult(status="completed", phase="class_images")
    # Hosts run their work under torch.inference_mode(); training leaves it explicitly.
    with torch.inference_mode(False), torch.enable_grad():
        if config.prior and class_items is None:
            host.phase("class_images")
            try:
                with accelerator.main_process_first():
                    class_items, result.class_note, result.class_images = class_images(
                        backend, config, host, resolution, should_stop=host.should_stop)
            except tuple(host.cancelled_by):
                class_items, result.class_note = None, "class-image generation cancelled (the images made are kept)"
            if main and log:
                log(result.class_note)
            if class_items is None:
                result.status = "cancelled"
                return result
        result.phase = "training"
        host.phase("training")
        trained = train(backend, config, data.items, class_items if config.prior else None, host.callbacks(),
                        accelerator=accelerator, flip=data.flip, release_frozen=release_frozen)
    result.training, result.step, result.history = trained, trained.step, list(trained.history)
    result.checkpoint_path = trained.checkpoint_path
    result.lora_path, result.full_paths = trained.lora_path, list(trained.full_paths)
    if trained.status == "cancelled":
        result.status = "cancelled"
        return result
    if main:
        host.phase("publishing")
        publish(result, config, host)
    return result


def publish(result: JobResult, config: TrainConfig, host: Host) -> None:
    """Copy the run's LoRA and checkpoints to where the host lists them, each written under a
    temporary name first (nothing half-written under the final name)."""
    if result.lora_path:
        dest = host.lora_destination(config.save_name)
        if dest is not None:
            _copy(Path(result.lora_path), dest)
            host.published(dest, "lora")
            result.lora_path = dest
    published = []
    for path in result.full_paths:
        dest = host.checkpoint_destination(Path(path))
        if dest is not None:
            _copy(Path(path), dest)
            host.published(dest, "checkpoint")
        published.append(str(dest or path))
    result.full_paths = published
    result.phase = "published"


def _copy(source: Path, dest: Path) -> None:
    with fileio.atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)
