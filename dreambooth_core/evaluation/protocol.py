"""The paper's DreamBench protocol, in miniature, on the toy world.

For each of eight toy subjects (objects whose colour/pattern combinations pretraining never
showed), DreamBooth is trained on five views with and without prior preservation; both models
and the base model then sample prompts of the paper's four kinds (recontextualization, property
modification, accessories, class hybrids) and the plain class prompt, and the samples are
measured (see metrics.py). The output mirrors the paper's Table 1 (subject and prompt fidelity)
and Table 3 (prior-preservation ablation: PRES, DIV).
"""
from __future__ import annotations

import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .. import fileio
from ..embedded import toyworld as tw
from ..backends.base import SampleSettings
from ..config import TrainConfig
from . import metrics as m

TOKEN = "sks"
TRAIN = dict(token=TOKEN, mode="lora", rank=8, lora_conv=True, learning_rate=2e-3, train_text_encoder=True, batch_size=2,
             offset_noise=0.1, prior_weight=1.0, lr_scheduler="constant")
SAMPLING = dict(steps=20, guidance=4.0)
# PRES is read off fresh samples of the plain class prompt: their seeds start far above those of the
# class images that prior preservation trains on (0, 1, ...), so a model that only memorised its
# class images does not pass for one that kept the class.
CLASS_SAMPLE_SEED = 100_000


@dataclass
class Plan:
    subjects: Sequence[tw.Subject] = tw.EVAL_SUBJECTS
    steps: int = 250
    seeds: Sequence[int] = (0, 1, 2, 3)
    class_images: int = 48
    instance_images: int = 5
    train_text_encoder: bool = TRAIN["train_text_encoder"]
    masked_loss: bool = False  # train on subject masks read off the renders (eval --masked-loss)
    caption_dropout: float = 0.0  # eval --caption-dropout
    sample_steps: int = SAMPLING["steps"]
    class_samples: int = 16  # plain-class samples per model and subject, for PRES

    @classmethod
    def quick(cls) -> "Plan":
        return cls(steps=200, seeds=(0, 1), class_images=32, class_samples=8)


def subject_masks(views: Sequence[np.ndarray]) -> List[np.ndarray]:
    """What a cut-out of each photo gives the masked loss: the object's pixels, read off the render,
    grown by one pixel so that its anti-aliased edge counts as subject."""
    grown = []
    for view in views:
        mask = tw.object_mask(view)
        pad = np.pad(mask, 1)
        grown.append(pad[1:-1, 1:-1] | pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:])
    return grown


def subject_prompts(subject: tw.Subject) -> List[m.EvalPrompt]:
    """Seven prompts of the paper's four kinds, chosen so that what they ask is measurable."""
    rng = random.Random(subject.name)
    own = {subject.thing.colour, subject.thing.colour2}
    free = [c for c in tw.COLOURS if c not in own]
    bgs = rng.sample(free, 2)
    colours = rng.sample([c for c in free if c not in bgs], 2)
    companion = next(c for c in ("white", "black", "red", "blue") if c not in own)
    others = rng.sample([s for s in tw.SHAPES if s != subject.class_noun and s not in ("ring", "cross")], 2)
    return [
        *(m.EvalPrompt("recontextualization", f"a photo of {{token}} {{class}} on {tw._article(b)} {b} background",
                       m.Ask(background=b)) for b in bgs),
        *(m.EvalPrompt("property_modification", f"a photo of {tw._article(c)} {c} {{token}} {{class}}",
                       m.Ask(colour=c)) for c in colours),
        m.EvalPrompt("accessories", f"a photo of {{token}} {{class}} next to a small {companion} circle",
                     m.Ask(companion=companion)),
        *(m.EvalPrompt("class_hybrid", f"a photo of {{token}} {s}", m.Ask(shape=s)) for s in others),
    ]


@dataclass
class ModelScores:
    fidelity: List[float] = field(default_factory=list)
    prompt: List[float] = field(default_factory=list)
    pres: List[float] = field(default_factory=list)
    div: List[float] = field(default_factory=list)
    identity: List[float] = field(default_factory=list)
    # prompt fidelity of each of the paper's four prompt kinds, one value per subject
    by_kind: Dict[str, List[float]] = field(default_factory=dict)

    def mean(self) -> Dict[str, float]:
        means = {k: float(np.nanmean(v)) if v else float("nan") for k, v in self.__dict__.items() if k != "by_kind"}
        means["prompt_by_kind"] = {k: float(np.nanmean(v)) for k, v in self.by_kind.items()}
        return means

    def extend(self, other: "ModelScores") -> None:
        for key, values in other.__dict__.items():
            if key == "by_kind":
                for kind, kind_values in values.items():
                    self.by_kind.setdefault(kind, []).extend(kind_values)
            else:
                getattr(self, key).extend(values)


def _score(images_by_prompt: Dict[str, List[np.ndarray]], prompts: List[m.EvalPrompt], identity: List[np.ndarray],
           class_images: List[np.ndarray], ref: np.ndarray, into: ModelScores) -> None:
    into.fidelity.append(m.subject_fidelity([im for p in prompts for im in images_by_prompt[p.template]] + identity, ref))
    per_prompt = [float(np.mean([p.ask.score(im) for im in images_by_prompt[p.template]])) for p in prompts]
    into.prompt.append(float(np.nanmean(per_prompt)))
    for kind in dict.fromkeys(p.kind for p in prompts):
        into.by_kind.setdefault(kind, []).append(
            float(np.nanmean([v for p, v in zip(prompts, per_prompt) if p.kind == kind])))
    into.identity.append(m.subject_fidelity(identity, ref))
    into.pres.append(m.subject_fidelity(class_images, ref))
    into.div.append(float(np.mean([m.diversity(images_by_prompt[p.template]) for p in prompts] + [m.diversity(identity)])))


def class_prompt(subject: tw.Subject) -> str:
    """The plain class prompt: what the class images are drawn from and what PRES samples."""
    return f"a photo of {tw._article(subject.class_noun)} {subject.class_noun}"


def _sample_all(backend, subject, prompts, seeds, settings, class_samples):
    """Every prompt and the identity prompt at the plan's seeds; the plain class prompt (for PRES) at
    `class_samples` fresh seeds. The last row holds the class samples."""
    texts = [p.text(TOKEN, subject.class_noun) for p in prompts]
    identity = f"a photo of {TOKEN} {subject.class_noun}"
    klass = class_prompt(subject)
    asked = texts + [identity]
    n = len(seeds)
    images = backend.generate([t for t in asked for _ in seeds] + [klass] * class_samples,
                              [s for _ in asked for s in seeds] + [CLASS_SAMPLE_SEED + k for k in range(class_samples)],
                              settings)
    rows = [images[i * n:(i + 1) * n] for i in range(len(asked))] + [images[len(asked) * n:]]
    by_prompt = {p.template: rows[i] for i, p in enumerate(prompts)}
    return by_prompt, rows[-2], rows[-1], rows


def _evaluate_subject(i: int, subject: tw.Subject, plan: Plan, output: Path) -> dict:
    """One subject end to end: class images, DreamBooth with and without prior preservation,
    samples of all three models, their scores and the subject's rows of the sample sheet."""
    from ..backends.diffusers_loading import load_backend
    from ..dataset import prepare_dataset
    from ..class_images.cache import ensure_class_images
    from ..training.trainer import train

    base = load_backend("embedded")
    res = base.native_resolution
    settings = SampleSettings(width=res, height=res, **dict(SAMPLING, steps=plan.sample_steps))
    ref = m.subject_reference(subject, size=res)
    prompts = subject_prompts(subject)
    views = tw.subject_views(subject, plan.instance_images, seed=1000 + i, size=res)
    data = prepare_dataset(views, token=TOKEN, class_noun=subject.class_noun, resolution=res,
                           masks=subject_masks(views) if plan.masked_loss else None)
    class_set = ensure_class_images(base, output / "class_images", class_prompt(subject), plan.class_images, settings,
                                    seed=0)
    class_items = class_set.load(resolution=res).items
    samples = {"base": _sample_all(base, subject, prompts, plan.seeds, settings, plan.class_samples)}
    for name, prior in (("prior", True), ("no_prior", False)):
        backend = load_backend("embedded")
        config = TrainConfig(**dict(TRAIN, train_text_encoder=plan.train_text_encoder,
                                    caption_dropout=plan.caption_dropout), class_noun=subject.class_noun,
                             prior=prior, steps=plan.steps, seed=i,
                             output_dir=str(output / "runs" / f"{subject.name}-{name}"),
                             save_name=f"{subject.name}-{name}")
        train(backend, config, data.items, class_items if prior else None)
        samples[name] = _sample_all(backend, subject, prompts, plan.seeds, settings, plan.class_samples)
    scores, sheet = {}, []
    for name, (by_prompt, identity, klass, rows) in samples.items():
        scores[name] = ModelScores()
        _score(by_prompt, prompts, identity, klass, ref, scores[name])
        # sheet: reference view | the first seed of each prompt (identity, prompts, class)
        order = [len(rows) - 2] + list(range(len(prompts))) + [len(rows) - 1]
        sheet.append((f"{subject.name} · {name.replace('_', ' ')}", [views[0]] + [rows[k][0] for k in order]))
    line = ", ".join(f"{n}: fid {s.fidelity[-1]:.3f} prompt {s.prompt[-1]:.2f} pres {s.pres[-1]:.3f}"
                     for n, s in scores.items())
    return {"scores": scores, "sheet": sheet, "line": f"{subject.name}: {line}"}


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def default_workers(n_subjects: int) -> int:
    """Subjects run in parallel processes, one core each: the toy model is too small for several
    threads to help one training, so one process per core is ~2x faster on two cores."""
    return max(1, min(n_subjects, os.cpu_count() or 1))


def run_eval(output: Path, plan: Plan, log=print, progress=None, workers: Optional[int] = None) -> dict:
    """Every subject of the plan (in `workers` processes), then the tables' numbers and the sheet."""
    from ..plots import grid_image

    t0 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    subjects = list(plan.subjects)
    workers = default_workers(len(subjects)) if workers is None else max(1, min(workers, len(subjects)))
    done: Dict[int, dict] = {}

    def finished(i: int, result: dict) -> None:
        done[i] = result
        log(f"[{len(done)}/{len(subjects)}] {result['line']}")
        if progress:
            progress(len(done), len(subjects))

    if workers == 1:
        for i, subject in enumerate(subjects):
            finished(i, _evaluate_subject(i, subject, plan, output))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_limit_threads, initargs=(threads,)) as pool:
            futures = {pool.submit(_evaluate_subject, i, subject, plan, output): i
                       for i, subject in enumerate(subjects)}
            for future in as_completed(futures):
                finished(futures[future], future.result())

    scores = {name: ModelScores() for name in ("base", "prior", "no_prior")}
    sheet_rows, sheet_labels = [], []
    for i in range(len(subjects)):  # in the plan's order, whichever finished first
        for name, subject_scores in done[i]["scores"].items():
            scores[name].extend(subject_scores)
        for label, row in done[i]["sheet"]:
            sheet_labels.append(label)
            sheet_rows.append(row)
    results = {name: s.mean() for name, s in scores.items()}
    results["per_subject"] = {name: s.__dict__ for name, s in scores.items()}
    results["subjects"] = [s.name for s in subjects]
    results["plan"] = {"steps": plan.steps, "seeds": list(plan.seeds), "class_images": plan.class_images,
                       "train_text_encoder": plan.train_text_encoder, "masked_loss": plan.masked_loss,
                       "caption_dropout": plan.caption_dropout,
                       "sample_steps": plan.sample_steps, "class_samples": plan.class_samples}
    results["workers"] = workers
    results["seconds"] = round(time.perf_counter() - t0, 1)
    cols = ["subject", "identity"] + [p.kind.replace("_", " ")[:14] for p in subject_prompts(subjects[0])] + ["class"]
    fileio.save_image(output / "samples.png", grid_image(sheet_rows, sheet_labels, cols, scale=3,
                                                          title="toy DreamBench: first seed of each prompt"))
    fileio.write_json(output / "results.json", results)
    return results


def ratios(results: dict) -> Dict[str, float]:
    p, n = results["prior"], results["no_prior"]
    return {"pres_ratio": p["pres"] / n["pres"], "fidelity_ratio": p["fidelity"] / n["fidelity"],
            "prompt_ratio": p["prompt"] / n["prompt"]}


def format_tables(results: dict) -> str:
    names = {"base": "Base model (no training)", "prior": "DreamBooth (ours, prior preservation)",
             "no_prior": "DreamBooth without prior preservation"}
    lines = ["Table 1 analogue — subject fidelity (DINO/CLIP-I analogue) and prompt fidelity (CLIP-T analogue)",
             f"| {'Method':40} | subject fidelity ↑ | identity-prompt fidelity ↑ | prompt fidelity ↑ |",
             f"|{'-' * 42}|-------------------|----------------------------|-------------------|"]
    for key in ("base", "prior", "no_prior"):
        r = results[key]
        lines.append(f"| {names[key]:40} | {r['fidelity']:17.3f} | {r['identity']:26.3f} | {r['prompt']:17.3f} |")
    lines += ["", "Table 3 analogue — prior-preservation ablation",
              f"| {'Method':40} | PRES ↓ | DIV ↑ | subject fidelity ↑ |",
              f"|{'-' * 42}|--------|-------|--------------------|"]
    for key in ("prior", "no_prior", "base"):
        r = results[key]
        lines.append(f"| {names[key]:40} | {r['pres']:6.3f} | {r['div']:5.3f} | {r['fidelity']:18.3f} |")
    kinds = list(results["base"].get("prompt_by_kind", {}))
    if kinds:
        heads = [k.replace("_", " ") for k in kinds]
        lines += ["", "Prompt fidelity by prompt kind",
                  f"| {'Method':40} | " + " | ".join(heads) + " |",
                  f"|{'-' * 42}|" + "|".join("-" * (len(h) + 2) for h in heads) + "|"]
        for key in ("base", "prior", "no_prior"):
            by_kind = results[key]["prompt_by_kind"]
            lines.append(f"| {names[key]:40} | " + " | ".join(f"{by_kind[k]:{len(h)}.3f}" for k, h in zip(kinds, heads))
                         + " |")
    return "\n".join(lines)
