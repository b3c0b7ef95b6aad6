"""The demo: teach the embedded model a subject it has never seen and show it in new contexts.

The subject is a toy-world object no pretraining scene contains (a circle, half pink and half
cyan: colours no pretraining caption names). Five photos of it on different backgrounds go
through the same dataset preparation, class-image cache and trainer as a user's photos would.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from .. import fileio
from ..embedded import toyworld
from ..backends.base import SampleSettings
from ..config import TrainConfig
from ..plots import grid_image

DEMO_SEEDS = (11, 12)
DEMO_SETTINGS = dict(
    token="sks",
    mode="lora",
    rank=8,
    lora_conv=True,
    learning_rate=2e-3,
    train_text_encoder=True,
    steps=300,
    batch_size=2,
    prior=True,
    prior_weight=1.0,
    num_class_images=48,
    class_steps=20,
    class_guidance=4.0,
    offset_noise=0.1,
    lr_scheduler="constant",
    save_name="demo_subject_lora",
    seed=0,
)
SAMPLE = dict(steps=20, guidance=4.0)


def demo_config(output: Path, steps: Optional[int] = None) -> TrainConfig:
    subject = toyworld.DEMO_SUBJECT
    settings = dict(DEMO_SETTINGS, class_noun=subject.class_noun, output_dir=str(output),
                    class_dir=str(output / "class_images"))
    if steps is not None:
        settings["steps"] = steps
    return TrainConfig(**settings).validate()


def run_demo(output: Path, steps: Optional[int] = None, log=print) -> dict:
    from ..backends.diffusers_loading import load_backend
    from .console import TerminalHost, progress_bar, train_callbacks
    from ..dataset import prepare_dataset
    from ..job import class_images
    from ..sampling.prompts import TOY_PROMPT_SETS, fill
    from ..dataset.tokens import require_single_token
    from ..training.trainer import train

    t0 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    config = demo_config(output, steps)
    subject = toyworld.DEMO_SUBJECT
    backend = load_backend("embedded")
    require_single_token(backend.tokenizers(), config.token)
    res = backend.native_resolution

    views = toyworld.subject_views(subject, 5, seed=7, size=res)
    data = prepare_dataset(views, token=config.token, class_noun=config.class_noun, resolution=res)
    fileio.save_image(output / "instance_images.png", grid_image([views], scale=4, title="instance images"))
    log(f"subject: {subject.thing} — {len(data.items)} instance images, caption '{data.items[0].caption}'")

    host = TerminalHost(config.steps)
    try:
        class_items, note, _ = class_images(backend, config, host, res)
    finally:
        host.close()
    log(note)

    prompts = [fill(t, config.token, config.class_noun) for ts in TOY_PROMPT_SETS.values() for t in ts]
    settings = SampleSettings(width=res, height=res, **SAMPLE)
    seeds = [s for _ in prompts for s in DEMO_SEEDS]
    flat = [p for p in prompts for _ in DEMO_SEEDS]
    bar = progress_bar(len(flat) * 2, "sample before/after")
    before = backend.generate(flat, seeds, settings)
    bar.update(len(flat))

    callbacks, train_bar = train_callbacks(config.steps, disable=False)
    try:
        result = train(backend, config, data.items, class_items, callbacks)
    finally:
        train_bar.close()
    after = backend.generate(flat, seeds, settings)
    bar.update(len(flat))
    bar.close()

    n = len(DEMO_SEEDS)
    rows = [before[i * n:(i + 1) * n] + after[i * n:(i + 1) * n] for i in range(len(prompts))]
    cols = [f"base {s}" for s in DEMO_SEEDS] + [f"trained {s}" for s in DEMO_SEEDS]
    grid = grid_image(rows, row_labels=prompts, col_labels=cols, scale=4,
                      title=f"DreamBooth on the embedded model: '{config.token} {config.class_noun}' = {describe(subject)}")
    fileio.save_image(output / "grid.png", grid)
    summary = {"seconds": round(time.perf_counter() - t0, 1), "steps": result.step,
               "lora": str(result.lora_path), "grid": str(output / "grid.png"),
               "loss_curve": str(output / "loss.png"), "config": str(output / "config.json")}
    fileio.write_json(output / "demo.json", summary)
    log(f"done in {summary['seconds']} s: grid {summary['grid']}, LoRA {summary['lora']}, "
        f"loss curve {summary['loss_curve']}")
    return {"summary": summary, "before": np.stack(before), "after": np.stack(after), "prompts": prompts,
            "result": result}


def describe(subject: toyworld.Subject) -> str:
    t = subject.thing
    return f"{t.colour} {t.shape} with {t.colour2} {t.pattern} pattern"
