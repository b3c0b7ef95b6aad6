"""What each CLI subcommand does; kept apart from argument parsing so it can be called directly."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from . import console
from .memory import malloc_trimmer, trim_after_unet_calls, trimming, tune_cpu_malloc


class _TrainHost(console.TerminalHost):
    """`train`'s host; `lean` on CPU tunes glibc's malloc once training starts (`tune_cpu_malloc`)
    and trims it after every step. Only then: sampling class images with mmap off costs ~0.7 GB more
    peak RSS (SD1.5, 256 px, batch 8) than the default allocator, more than the training steps need."""

    def __init__(self, steps: int, *, lean: bool, **kwargs):
        super().__init__(steps, **kwargs)
        self.lean = lean

    def callbacks(self):
        callbacks = super().callbacks()
        libc = tune_cpu_malloc() if self.lean and self._accelerator.device.type == "cpu" else None
        return trimming(callbacks, malloc_trimmer(libc)) if libc is not None else callbacks


def run_training(config, *, force_token: bool = False, backend=None, log=print, lean: bool = False):
    """The whole `train` job: load, check, prepare the photos, then the core job (class images, train).

    `lean` (what `train` on the command line uses): free the VAE and frozen text encoders once
    their outputs are cached (the returned backend then cannot sample), and on CPU tune glibc's
    malloc for this process and trim it after every step. Returns (job.JobResult, backend)."""
    import torch

    from ..training.accel import make_accelerator
    from ..backends.diffusers_loading import load_backend
    from ..job import check_job, prepare_instance_images, run_job

    accelerator = make_accelerator(config)
    main = accelerator.is_main_process
    if backend is None:
        frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        if accelerator.device.type == "cpu":
            frozen_dtype = torch.float32
        backend = load_backend(config.model, device=accelerator.device, weight_dtype=frozen_dtype,
                               prediction_type=config.prediction_type)
    # One process only: several could stop at different steps and leave each other waiting.
    stopper = console.ctrl_c_stops_after_the_step(log) if accelerator.num_processes == 1 else contextlib.nullcontext()
    with stopper as should_stop:
        host = _TrainHost(config.steps, lean=lean, accelerator=accelerator, show=main, stop=should_stop)
        check = check_job(config, host, tokenizers=backend.tokenizers(), native_resolution=backend.native_resolution,
                          force_token=force_token)
        if main and not check.single:
            log(f"warning: {check.message}")
        data = prepare_instance_images(config)
        if main:
            log(data.summary())
            for c in config.concepts:
                phrase = f"{c['token']} {c['class_noun']}".strip()
                log(f"subject '{phrase}': {c['images']} image(s), repeats {c['repeats']}, "
                    f"loss weight {c['loss_weight']:g}")
        try:
            result = run_job(backend, config, data, host, release_frozen=lean, log=log)
        finally:
            host.close()
    return result, backend


def cmd_train(args) -> int:
    from ..config import build_config
    from ..dataset.concepts import read_concepts_file
    from ..training.trainer import TrainingDiverged, TrainingOutOfMemory

    if getattr(args, "concepts_file", None):  # read before the config is checked: it names the subjects
        args.concepts = [c.to_dict() for c in read_concepts_file(args.concepts_file)]
    config = build_config(args)
    try:
        result, _ = run_training(config, force_token=args.force_token, lean=True)
    except (TrainingDiverged, TrainingOutOfMemory) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if result.status == "cancelled" and result.phase == "class_images":
        print(f"cancelled while making class images; {result.class_note}")
        return 130
    if result.status == "cancelled":
        print(f"cancelled at step {result.step}; resume with --resume (checkpoint: {result.checkpoint_path})")
        return 130
    if result.lora_path:
        print(f"LoRA: {result.lora_path}")
    for p in result.full_paths[:3]:
        print(f"weights: {p}")
    print(f"loss curve: {Path(config.output_dir) / 'loss.png'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.output), steps=args.steps)
    return 0


def cmd_sample(args) -> int:
    from ..backends.base import SampleSettings
    from ..backends.diffusers_loading import load_backend
    from ..fileio import save_image
    from ..adapters import load_lora, read_lora_file
    from ..sampling.prompts import fill, prompt_set, sample_grid

    backend = load_backend(args.model)
    token, class_noun = args.token, args.class_noun
    if args.lora:
        meta = read_lora_file(args.lora)[1]
        token = token or meta.get("dreambooth_token")
        class_noun = class_noun or meta.get("dreambooth_class_noun")
        load_lora(backend.lora_targets(True, True, conv=True), args.lora, multiplier=args.lora_scale)
    token, class_noun = token or "sks", class_noun or ""
    toy = backend.describe() == "embedded"
    if args.prompts:
        prompts = [fill(p, token, class_noun) for p in args.prompts]
    else:
        prompts = prompt_set(args.prompt_set or "all", token, class_noun, toy=toy)
    res = args.resolution or backend.native_resolution
    settings = SampleSettings(steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                              negative_prompt=args.negative_prompt, width=res, height=res)
    bar = console.progress_bar(len(prompts) * len(args.seeds), "sample")
    grid, _ = sample_grid(backend, prompts, args.seeds, settings, scale=max(1, 256 // res),
                          progress=console.progress_callback(bar))
    bar.close()
    save_image(args.output, grid)
    print(f"grid: {args.output}")
    return 0


def cmd_prepare(args) -> int:
    from ..dataset import DatasetError, prepare_dataset

    try:
        data = prepare_dataset(args.input_dir, token=args.token, class_noun=args.class_noun,
                               caption_template=args.caption_template, resolution=args.resolution, crop=args.crop,
                               flip=args.flip, recursive=args.recursive, min_size=args.min_size, seed=args.seed,
                               masks="alpha" if args.masked_loss else None)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    data.save(args.output)
    print(data.summary())
    print(f"wrote {len(data.items)} images and report.json to {args.output}")
    return 0


def cmd_class_images(args) -> int:
    from ..backends.diffusers_loading import load_backend
    from ..config import TrainConfig
    from ..job import class_images

    if not (args.class_prompt or args.class_noun):
        raise ValueError("--class-noun or --class-prompt: say which class to generate (e.g. --class-noun dog)")
    import torch

    cuda = torch.cuda.is_available()
    libc = None if cuda else tune_cpu_malloc()
    backend = load_backend(args.model, device=torch.device("cuda") if cuda else None)
    trim_after_unet_calls(backend, malloc_trimmer(libc) if libc is not None else None)
    config = TrainConfig(class_noun=args.class_noun or "", class_prompt=args.class_prompt,
                         num_class_images=args.count, class_dir=args.class_dir, class_steps=args.steps,
                         class_guidance=args.guidance, class_sampler=args.sampler,
                         negative_prompt=args.negative_prompt, seed=args.seed)
    host = console.TerminalHost(0)
    try:
        _, note, _ = class_images(backend, config, host, args.resolution or backend.native_resolution)
    finally:
        host.close()
    print(note)
    return 0


def cmd_token(args) -> int:
    from ..backends.diffusers_loading import load_tokenizers
    from ..dataset.tokens import TokenError, check_token, require_single_token, suggest_tokens

    tokenizers = load_tokenizers(args.model)
    if args.token_command == "suggest":
        for word in suggest_tokens(tokenizers, n=args.n, seed=args.seed):
            print(word)
        return 0
    check = check_token(tokenizers, args.word)
    for pieces in check.pieces:
        print(f"{args.word!r} → {pieces}")
    try:
        check = require_single_token(tokenizers, args.word, force=args.force)
    except TokenError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    print(check.message)
    return 0


def cmd_eval(args) -> int:
    from dataclasses import replace

    from ..evaluation.protocol import Plan, format_tables, ratios, run_eval

    plan = Plan.quick() if args.quick else Plan()
    if args.subjects:
        plan = replace(plan, subjects=plan.subjects[: args.subjects])
    if args.steps:
        plan = replace(plan, steps=args.steps)
    if args.frozen_text_encoder:
        plan = replace(plan, train_text_encoder=False)
    if args.masked_loss:
        plan = replace(plan, masked_loss=True)
    if args.caption_dropout:
        plan = replace(plan, caption_dropout=args.caption_dropout)
    bar = console.progress_bar(len(plan.subjects), "subjects", unit="subject")
    results = run_eval(Path(args.output), plan, log=bar.write, progress=console.progress_callback(bar), workers=args.workers)
    bar.close()
    print(format_tables(results))
    print(f"samples: {Path(args.output) / 'samples.png'}; results: {Path(args.output) / 'results.json'}")
    r = ratios(results)
    print(f"pres_ratio={r['pres_ratio']:.2f} fidelity_ratio={r['fidelity_ratio']:.2f} prompt_ratio={r['prompt_ratio']:.2f}")
    return 0
