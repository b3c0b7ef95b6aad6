"""ComfyUI as the host of a core DreamBooth job (dreambooth_core.job): where the LoRA goes, how
progress reaches the node and the page, and what Cancel is."""
from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management as mm

from ..dreambooth_core.job import Host
from . import paths

log = logging.getLogger("dreambooth")


def safe_progress(bar, value: int, total: int) -> None:
    """Update a ComfyUI progress bar without letting its Cancel check escape: the host's hook
    raises InterruptProcessingException (and clears the flag) when Cancel was pressed; the flag is
    put back so that should_stop() sees it at a point where the run can save its state."""
    try:
        bar.update_absolute(value, total)
    except mm.InterruptProcessingException:
        mm.interrupt_current_processing(True)


def _log_phase(name: str) -> None:
    log.info("DreamBooth Train: %s", name)


class TrainHost(Host):
    """The LoRA goes to models/loras; progress to the node's bar and the page's live view (`run`,
    `bar`: set when the run starts). Cancel arrives as the host's flag between steps (0.3.64) or as
    its exception from inside the model (0.3.65 on): both end the run with a checkpoint of the last
    finished step."""

    cancelled_by = (mm.InterruptProcessingException,)
    run = None  # live.LiveRun
    bar = None  # comfy.utils.ProgressBar

    def lora_destination(self, save_name: str) -> Path:
        return Path(paths.lora_dir()) / f"{save_name}.safetensors"

    def should_stop(self) -> bool:
        return mm.processing_interrupted()

    def callbacks(self):
        callbacks = super().callbacks()
        callbacks.on_step, callbacks.on_preview, callbacks.on_phase = self._on_step, self.run.preview, _log_phase
        return callbacks

    def _on_step(self, info) -> None:
        safe_progress(self.bar, info.step, info.total)
        self.run.step(info.step, info.total, info.loss, info.instance_loss, info.prior_loss, info.lr,
                      info.seconds_per_step, info.eta_seconds)
