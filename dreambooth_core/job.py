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
from dataclasses import dataclass, field, replace
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
    concepts = _check_concepts(config) if config.concepts else None
    config.validate()
    check_available(config.optimizer)
    if config.mode == "lora":
        dest = host.lora_destination(config.save_name)
        if dest is not None:
            check_replaceable(dest)
    if tokenizers is None:
        return None
    if concepts is None:
        return require_single_token(tokenizers, config.token, force=force_token)
    checks = [require_single_token(tokenizers, c.token, force=force_token) for c in concepts]
    return next((ch for ch in checks if not ch.single), checks[0])


def _check_concepts(config: TrainConfig) -> list:
    """A run of several subjects (config.concepts): each one's values, distinct identifiers, and class
    folders that can serve them; the config's token and class noun become the first subject's (previews,
    the file's picture). The concepts are written back in full (absolute folders) for config.json."""
    from .dataset.concepts import check_concepts, parse_concepts

    if config.instance_dir:
        raise ValueError("instance_dir: with concepts, each subject's photos are its concept's instance_dir; "
                         "remove instance_dir (or the concepts)")
    concepts = parse_concepts(config.concepts)
    check_concepts(concepts, config.prior)
    config.token, config.class_noun = concepts[0].token, concepts[0].class_noun
    config.concepts = [c.to_dict() for c in concepts]
    if config.prior:
        _class_folders(config, concepts)
    return concepts


def concepts_of(config: TrainConfig) -> list:
    """The run's subjects (dataset.concepts.Concept): config.concepts, or the one subject of instance_dir,
    token and class_noun."""
    from .dataset.concepts import Concept, parse_concepts

    if config.concepts:
        return parse_concepts(config.concepts)
    return [Concept(config.instance_dir, config.token, config.class_noun, class_dir=config.class_dir)]


def class_prompt_of(config: TrainConfig, concept) -> str:
    """The class prompt of a subject: the run's class prompt template with its class noun."""
    return replace(config, class_noun=concept.class_noun).resolved_class_prompt()


def _class_folders(config: TrainConfig, concepts: Sequence) -> dict:
    """Class prompt -> (class noun, class folder or None: the host's cache) of a run of several subjects.
    Subjects of one class share its images; a concept's class_dir holds its class's images (or caches
    them), the config's class_dir is the cache of the others and must not hold images of one class."""
    from .dataset import IMAGE_EXTS

    shared = Path(config.class_dir) if config.class_dir else None
    if shared and shared.is_dir() and any(p.suffix.lower() in IMAGE_EXTS for p in shared.iterdir()):
        raise ValueError(f"class_dir {shared}: holds images, but the run has several subjects; give each "
                         "concept its own class_dir (class_dir then only says where generated class images "
                         "are cached)")
    folders: dict = {}
    owner: dict = {}
    for c in concepts:
        prompt = class_prompt_of(config, c)
        before = folders.get(prompt, (None, None))[1]
        if prompt in owner and c.class_dir and before not in (None, c.class_dir, config.class_dir):
            raise ValueError(f"concepts '{owner[prompt]}' and '{c.phrase}' share the class prompt {prompt!r} but "
                             f"name different class_dir ({before}, {c.class_dir}): give both the same "
                             "class_dir, or one of them none")
        folders[prompt] = (c.class_noun, c.class_dir or before or config.class_dir)
        owner.setdefault(prompt, c.phrase)
    return folders


def prepare_instance_images(config: TrainConfig, source: Any = None):
    """The subject's photos (a folder, files or in-memory images; default `config.instance_dir`)
    prepared with the run's caption template, resolution, crop, flip and masks. With config.concepts,
    every subject's photos, combined (dataset.concepts.combine); each concept's `images` is filled in."""
    from .dataset.concepts import combine

    if config.concepts and source is not None:
        raise ValueError("concepts: each subject's photos come from its concept's instance_dir; give either the "
                         "concepts or the photos, not both")
    if config.concepts:
        concepts = concepts_of(config)
        parts = []
        for i, c in enumerate(concepts):
            if not c.instance_dir:
                raise ValueError(f"concept {i + 1} ('{c.phrase}'): instance_dir is missing; give the folder with "
                                 "3-30 photos of that subject")
            data = _prepare(config, c.instance_dir, c.token, c.class_noun)
            c.images = len(data.items)
            parts.append((c, data, class_prompt_of(config, c)))
        config.concepts = [c.to_dict() for c in concepts]
        return combine(parts)
    source = config.instance_dir if source is None else source
    if source is None or (isinstance(source, (str, os.PathLike)) and not str(source)):
        raise ValueError("instance_dir: give the folder with 3-30 photos of your subject")
    return _prepare(config, source, config.token, config.class_noun)


def _prepare(config: TrainConfig, source: Any, token: str, class_noun: str):
    from .dataset import prepare_dataset

    return prepare_dataset(source, token=token, class_noun=class_noun,
                           caption_template=config.instance_prompt or DEFAULT_INSTANCE_TEMPLATE,
                           resolution=config.resolution, crop=config.crop, flip=config.flip, seed=config.seed,
                           masks="alpha" if config.masked_loss else None)


def class_images(backend, config: TrainConfig, host: Host, resolution: int, should_stop=None):
    """The class images: the user's own if `config.class_dir` holds images, else generated through
    the backend and cached (only the missing ones are made). Returns (items or None when stopped,
    a one-line note, the generated set or None). With several subjects, those of every class
    (class_images_per_class)."""
    if config.concepts:
        return class_images_per_class(backend, config, host, resolution, should_stop)
    return _class_images(backend, config, host, resolution, should_stop)


def class_images_per_class(backend, config: TrainConfig, host: Host, resolution: int, should_stop=None):
    """The class images of a run of several subjects: one set per class prompt, shared by the subjects
    of that class, each made (or read) as `class_images` makes one. Returns (all items or None when
    stopped, the notes, the first generated set or the stopped one)."""
    concepts = concepts_of(config)
    if config.class_prompt and "{class}" not in config.class_prompt and len({c.class_noun for c in concepts}) > 1:
        raise ValueError(f"class_prompt {config.class_prompt!r}: the subjects are of several classes; write the "
                         "class as {class} (e.g. 'a photo of a {class}') so that each class gets its own images")
    notes, items, first = [], [], None
    for noun, folder in _class_folders(config, concepts).values():
        one = replace(config, class_noun=noun, class_dir=folder, concepts=[])
        made_items, note, made = _class_images(backend, one, host, resolution, should_stop)
        notes.append(note)
        first = first or made
        if made_items is None:
            return None, "; ".join(notes), made
        items += made_items
    return items, "; ".join(notes), first


def _class_images(backend, config: TrainConfig, host: Host, resolution: int, should_stop=None):
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
        if config.prior:
            check_class_pairs(data.items, class_items)
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


def check_class_pairs(items: Sequence, class_items: Sequence) -> None:
    """Before training: in a run of subjects of several classes every subject's class prompt has class
    images (captioned with it), since each instance sample's prior sample is drawn from its own class."""
    from .training.cache import concept_fields

    if "class_prompt" not in concept_fields(items):
        return
    have = {getattr(ex, "caption", "") for ex in class_items}
    missing = sorted({ex.class_prompt for ex in items} - have)
    if missing:
        raise ValueError(f"class images: none for {', '.join(repr(m) for m in missing)} (the class images given are "
                         f"of {', '.join(repr(h) for h in sorted(have))}); give every subject's class its class images")


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
