"""The terminal side of the CLI and the demo: progress bars, training callbacks, Ctrl-C, and the
command line as a job's host."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Optional

from ..job import Host



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


class TerminalHost(Host):
    """The command line as a job's host: progress bars on stderr, a stop flag (Ctrl-C), class images
    in --class-dir or the user's cache, the LoRA left in the run folder. `accelerator`: the one the
    command made to load its model (None: one is made for the run). `show`: False in the other
    processes of a multi-process launch."""

    def __init__(self, steps: int, *, accelerator=None, show: bool = True,
                 stop: Optional[Callable[[], bool]] = None):
        self.steps, self.show, self._stop, self._accelerator = steps, show, stop, accelerator
        self._class_bar = self._train_bar = None

    def accelerator(self, config, device):
        if self._accelerator is not None:
            return self._accelerator
        from ..training.accel import make_accelerator

        return make_accelerator(config, device)

    def should_stop(self) -> bool:
        return bool(self._stop and self._stop())

    def class_progress(self, done: int, total: int) -> None:
        if self._class_bar is None:
            self._class_bar = progress_bar(total, "class images", not self.show)
        progress_callback(self._class_bar)(done, total)

    def phase(self, name: str) -> None:
        if name != "class_images" and self._class_bar is not None:
            self._class_bar.close()

    def callbacks(self):
        callbacks, self._train_bar = train_callbacks(self.steps, disable=not self.show, should_stop=self.should_stop)
        return callbacks

    def close(self) -> None:
        for bar in (self._class_bar, self._train_bar):
            if bar is not None:
                bar.close()


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
    from ..training.trainer import Callbacks

    bar = progress_bar(total, "train", disable)

    def on_step(info) -> None:
        bar.n = info.step
        post = {"loss": f"{info.loss:.4f}"}
        if info.prior_loss is not None:
            post["prior"] = f"{info.prior_loss:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    def on_phase(name: str) -> None:
        # The trainer's phases are single words; a sentence (resuming with changed settings) is news.
        if " " in name and not disable:
            bar.write(name, file=sys.stderr)

    return Callbacks(on_step=on_step, should_stop=should_stop, on_phase=on_phase), bar
