"""The terminal side of the CLI and the demo: progress bars, training callbacks, Ctrl-C, and where
their class images come from."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

DEFAULT_CACHE = Path(os.environ.get("DREAMBOOTH_CACHE", Path.home() / ".cache" / "dreambooth")) / "class_images"


def progress_bar(total: int, desc: str, disable: bool = False, unit: Optional[str] = None):
    from tqdm.auto import tqdm

    unit = unit or ("step" if "train" in desc else "img")
    return tqdm(total=total, desc=desc, unit=unit, disable=disable,
                dynamic_ncols=True, file=sys.stderr)


def progress_callback(bar):
    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return update


def resolve_class_images(backend, config, resolution: int, *, disable_bars: bool = False, should_stop=None):
    """User class images if --class-dir holds images, else generated ones from the cache."""
    from .backends.base import SampleSettings
    from .dataset import IMAGE_EXTS
    from .prior import ensure_class_images, load_class_folder

    prompt = config.resolved_class_prompt()
    folder = Path(config.class_dir) if config.class_dir else None
    if folder and folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir()):
        data = load_class_folder(folder, resolution=resolution, class_prompt=prompt)
        return data.items, f"{len(data.items)} class images from {folder}"
    settings = SampleSettings(steps=config.class_steps, guidance=config.class_guidance, sampler=config.class_sampler,
                              negative_prompt=config.negative_prompt, width=resolution, height=resolution)
    bar = progress_bar(config.num_class_images, "class images", disable_bars)
    try:
        result = ensure_class_images(backend, folder or DEFAULT_CACHE, prompt, config.num_class_images, settings,
                                     seed=config.seed, progress=progress_callback(bar), should_stop=should_stop)
    finally:
        bar.close()
    if not result.complete:
        raise RuntimeError(f"class-image generation stopped after {len(result.paths)} of {result.count}")
    note = f"{len(result.paths)} class images for '{prompt}' ({result.reused} cached, {result.generated} new) in {result.folder}"
    return result.load(resolution=resolution).items, note


@contextlib.contextmanager
def ctrl_c_stops_after_the_step(log=print):
    """Within the block, the first Ctrl-C asks training to stop after the step it is in (a checkpoint
    of that step is kept, `--resume` continues); a second one aborts at once. Yields the flag the
    trainer polls. Only in the main thread of a single process: several processes could stop at
    different steps and leave each other waiting."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed.is_set
        return

    def on_sigint(signum, frame):
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()
        log("\nCtrl-C: stopping after this step and keeping a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def train_callbacks(total: int, disable: bool, should_stop=None):
    from .trainer import Callbacks

    bar = progress_bar(total, "train", disable)

    def on_step(info) -> None:
        bar.n = info.step
        post = {"loss": f"{info.loss:.4f}"}
        if info.prior_loss is not None:
            post["prior"] = f"{info.prior_loss:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    return Callbacks(on_step=on_step, should_stop=should_stop), bar
