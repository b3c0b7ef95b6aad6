"""`eval --multi`: two subjects in one image, measured in the toy world.

Each subject of a pair gets its own DreamBooth LoRA (the single-subject protocol's settings, its own
identifier: `sks` and `ohwx`). The embedded model draws one centred object on a 32-pixel canvas and
nothing sensible on a wider one, so a two-subject image is a 32×64 canvas of two regions, the first
subject asked for on the left and the second on the right (each with its own background), sampled
as one image:
- **alone**: each subject's LoRA on its own 32-pixel image (the reference);
- **LoRA stacking**: both LoRAs on the whole model, each region with its own prompt (what loading
  two LoRAs with Load LoRA and area prompts does);
- **regional composition**: each region with only its own LoRA (ComfyUI's hook LoRAs on area
  conditioning; dreambooth_core.sampling.regional);
- **joint training**: one LoRA trained on both subjects in one run (their concepts: each subject's
  photos under its own identifier, each class's prior), twice the steps of a single subject's run so
  each subject gets as many draws; both regions sample that one LoRA.

Per pair and method it reports each subject's fidelity (on its half), leakage (share of a subject's
object in the colours only the other subject wears), cross-similarity (a half's descriptor against
the *other* subject: its pattern and colours showing up) and prompt fidelity (background and shape
of each half), then one line of ratios, regional ÷ stacking.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import fileio
from ..backends.base import SampleSettings
from ..embedded import toyworld as tw
from . import metrics as m
from . import protocol

Pair = Tuple[tw.Subject, tw.Subject]
TOKENS = ("sks", "ohwx")  # both single tokens of the CLIP tokenizer, the two most used identifiers
SIZE = 32  # one region: the embedded model's native canvas
SECOND_SEED = 1000  # the right region's noise seed is the left one's + this
# Pairs whose four colours are all different, so either subject's colours on the other are leakage.
PAIRS: Tuple[Pair, ...] = (
    (tw.EVAL_SUBJECTS[0], tw.EVAL_SUBJECTS[2]),  # diagonal-star (pink/cyan), target-circle (brown/yellow)
    (tw.EVAL_SUBJECTS[1], tw.EVAL_SUBJECTS[3]),  # split-heart (cyan/orange), zigzag-square (yellow/purple)
)
METHODS = ("alone", "stacking", "regional", "joint")
LABELS = {"alone": "each alone (its own LoRA and image)", "stacking": "LoRA stacking (both LoRAs, area prompts)",
          "regional": "regional composition (hook LoRAs per area)",
          "joint": "joint training (one LoRA, both subjects)"}

@dataclass
class MultiPlan:
    pairs: Sequence[Pair] = PAIRS
    steps: int = 250
    seeds: Sequence[int] = tuple(range(8))
    class_images: int = 32
    instance_images: int = 5
    sample_steps: int = protocol.SAMPLING["steps"]

    @classmethod
    def quick(cls) -> "MultiPlan":
        return cls(pairs=PAIRS[:1], steps=200, seeds=tuple(range(4)), class_images=16)


# --- measurement ------------------------------------------------------------------------------

_TONES = np.array([tw.rgb_of(c) for c in tw.PALETTE], np.float32)
_NAMES = list(tw.PALETTE)


def colour_share(image: np.ndarray, colours: Sequence[str]) -> float:
    """Share of the object's pixels whose nearest palette colour is one of `colours`."""
    mask = tw.object_mask(image)
    if mask.sum() < 8 or not colours:
        return 0.0
    pixels = image[mask].astype(np.float32)
    nearest = ((pixels[:, None] - _TONES[None]) ** 2).sum(-1).argmin(1)
    return float(np.isin(nearest, [_NAMES.index(c) for c in colours]).mean())


def only_colours(subject: tw.Subject, other: tw.Subject) -> List[str]:
    """The colours `subject` wears and `other` does not: seen on `other`, they leaked."""
    own = {other.thing.colour, other.thing.colour2}
    return [c for c in (subject.thing.colour, subject.thing.colour2) if c and c not in own]


def backgrounds(pair: Pair, seed: int) -> Tuple[str, str]:
    """Two different background colours neither subject wears, one per region, drawn per seed."""
    worn = {c for s in pair for c in (s.thing.colour, s.thing.colour2)}
    return tuple(random.Random(f"{pair[0].name}+{pair[1].name}:{seed}").sample(
        [c for c in tw.COLOURS if c not in worn], 2))  # type: ignore[return-value]


def region_prompt(subject: tw.Subject, token: str, background: str) -> str:
    return f"a photo of {token} {subject.class_noun} on {tw._article(background)} {background} background"


def score_pair(halves: Sequence[Tuple[np.ndarray, np.ndarray]], pair: Pair, asked: Sequence[Tuple[str, str]],
               refs: Tuple[np.ndarray, np.ndarray]) -> Dict[str, object]:
    """The method's numbers from (first subject's image, second subject's image) per seed."""
    a, b = pair
    fid = [m.subject_fidelity([h[k] for h in halves], refs[k]) for k in (0, 1)]
    leak = np.mean([(colour_share(h[0], only_colours(b, a)) + colour_share(h[1], only_colours(a, b))) / 2
                    for h in halves])
    cross = np.mean([(m.descriptor(h[0]) @ refs[1] + m.descriptor(h[1]) @ refs[0]) / 2 for h in halves])
    prompt = np.mean([(m.Ask(background=bg[0], shape=a.class_noun).score(h[0]) +
                       m.Ask(background=bg[1], shape=b.class_noun).score(h[1])) / 2 for h, bg in zip(halves, asked)])
    return {"fidelity": fid, "leakage": float(leak), "cross": float(cross), "prompt": float(prompt)}


# --- training (one process per subject) -------------------------------------------------------

def _subject_photos(subject: tw.Subject, token: str, plan: MultiPlan):
    """The subject's instance photos, prepared; the same for its own run and a joint one."""
    from ..dataset import prepare_dataset

    views = tw.subject_views(subject, plan.instance_images, seed=1000 + tw.EVAL_SUBJECTS.index(subject), size=SIZE)
    return prepare_dataset(views, token=token, class_noun=subject.class_noun, resolution=SIZE)


def _train(subjects: Sequence[tw.Subject], tokens: Sequence[str], seed: int, plan: MultiPlan, output: Path,
           name: str) -> str:
    """The single-subject protocol's DreamBooth LoRA (prior preservation) of these subjects in one run
    (several: as concepts, each class's images paired with its own subjects); its file."""
    from ..adapters.kohya import save_lora
    from ..backends.diffusers_loading import load_backend
    from ..class_images.cache import ensure_class_images
    from ..config import TrainConfig
    from ..dataset.concepts import Concept, combine
    from ..training.trainer import train

    import torch

    backend = load_backend("embedded")
    settings = SampleSettings(width=SIZE, height=SIZE, **dict(protocol.SAMPLING, steps=plan.sample_steps))
    parts, class_items = [], []
    for subject, token in zip(subjects, tokens):
        prompt = protocol.class_prompt(subject)
        parts.append((Concept(None, token, subject.class_noun), _subject_photos(subject, token, plan), prompt))
        class_set = ensure_class_images(backend, output / "class_images", prompt, plan.class_images, settings, seed=0)
        class_items += class_set.load(resolution=SIZE).items
    data = parts[0][1] if len(parts) == 1 else combine(parts)
    concepts = [c.to_dict() for c, _, _ in parts] if len(parts) > 1 else []  # the file names every subject
    config = TrainConfig(**dict(protocol.TRAIN, token=tokens[0]), class_noun=subjects[0].class_noun, prior=True,
                         steps=plan.steps * len(subjects), seed=seed, output_dir=str(output / "runs" / name),
                         save_name=name, concepts=concepts)
    result = train(backend, config, data.items, class_items)
    path = output / "loras" / f"{name}.safetensors"
    save_lora(result.network, path, dtype=torch.float32)
    return str(path)


def joint_name(pair: Pair) -> str:
    return f"joint-{pair[0].name}+{pair[1].name}"


def _train_all(jobs: List[Tuple[tw.Subject, str]], plan: MultiPlan, output: Path, workers: int, log) -> Dict[str, str]:
    """Each subject's own LoRA and each pair's joint one, in parallel processes; {name: file}."""
    runs = [((s,), (t,), i, s.name) for i, (s, t) in enumerate(jobs)]
    runs += [(pair, TOKENS, 0, joint_name(pair)) for pair in plan.pairs]
    if workers == 1:
        paths = [_train(*run[:3], plan, output, run[3]) for run in runs]
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=protocol._limit_threads, initargs=(threads,)) as pool:
            futures = [pool.submit(_train, *run[:3], plan, output, run[3]) for run in runs]
            paths = [f.result() for f in futures]
    for (subjects, tokens, _, name), path in zip(runs, paths):
        log(f"trained {' + '.join(f'{t} {s.class_noun}' for s, t in zip(subjects, tokens))} ({name}): {path}")
    return {run[3]: p for run, p in zip(runs, paths)}


# --- sampling ---------------------------------------------------------------------------------

def sample_method(backend, method: str, pair: Pair, networks, plan: MultiPlan) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(left subject's image, right subject's image) at each seed of the plan; `networks` holds each
    subject's LoRA (alone, stacking, regional) or the joint LoRA twice (joint)."""
    from ..sampling.regional import Region, noise_for, sample_regions

    settings = SampleSettings(width=2 * SIZE, height=SIZE, **dict(protocol.SAMPLING, steps=plan.sample_steps))
    channels = backend.unet.config.in_channels
    out = []
    for seed in plan.seeds:
        seeds = (seed, seed + SECOND_SEED)
        prompts = [region_prompt(s, t, bg) for s, t, bg in zip(pair, TOKENS, backgrounds(pair, seed))]
        if method == "alone":
            out.append(tuple(sample_regions(backend, [Region(p, (0, 0, SIZE, SIZE), (n,))],
                                            noise_for([s], channels, SIZE), settings)
                             for p, n, s in zip(prompts, networks, seeds)))
            continue
        scoped = {"stacking": [tuple(networks)] * 2, "regional": [(n,) for n in networks],
                  "joint": [tuple(networks[:1])] * 2}[method]
        regions = [Region(p, (0, k * SIZE, SIZE, SIZE), nets) for k, (p, nets) in enumerate(zip(prompts, scoped))]
        image = sample_regions(backend, regions, noise_for(seeds, channels, SIZE), settings)
        out.append((image[:, :SIZE], image[:, SIZE:]))
    return out


def _networks(backend, paths: Sequence[str]):
    """Each file's LoRA over the backend's own modules, detached: the regional sampler patches weights."""
    from ..adapters.kohya import load_lora

    targets = backend.lora_targets(True, True, conv=True)
    networks = []
    for path in paths:
        network = load_lora(targets, path)
        network.detach()
        networks.append(network)
    return networks


# --- the run ----------------------------------------------------------------------------------

def evaluate_pair(backend, pair: Pair, lora_paths: Sequence[str], joint_path: str, plan: MultiPlan,
                  log=print) -> Tuple[dict, Dict[str, List[np.ndarray]]]:
    """Every method on one pair, from each subject's LoRA file and the pair's joint one: the pair's
    numbers and, per method, its samples (both halves side by side) for the picture."""
    refs = (m.subject_reference(pair[0], size=SIZE), m.subject_reference(pair[1], size=SIZE))
    asked = [backgrounds(pair, s) for s in plan.seeds]
    own = _networks(backend, lora_paths)
    entry: dict = {"pair": [s.name for s in pair], "tokens": list(TOKENS)}
    rows: Dict[str, List[np.ndarray]] = {}
    for method in METHODS:
        nets = own if method != "joint" else _networks(backend, [joint_path])
        halves = sample_method(backend, method, pair, nets, plan)
        r = entry[method] = score_pair(halves, pair, asked, refs)
        rows[method] = [np.concatenate(h, axis=1) for h in halves]
        log(f"{' + '.join(entry['pair'])}, {method}: fidelity {r['fidelity'][0]:.3f} / {r['fidelity'][1]:.3f}, "
            f"leakage {r['leakage']:.3f}, cross {r['cross']:.3f}, prompt {r['prompt']:.3f}")
    return entry, rows


def run_multi(output: Path, plan: MultiPlan, log=print, workers: Optional[int] = None) -> dict:
    """Train each subject once, sample every method for every pair, score; write results.json and the
    picture two_subjects.png (first pair: one row per method, one column per seed)."""
    from ..backends.diffusers_loading import load_backend
    from ..plots import grid_image

    t0 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    jobs = list(dict.fromkeys((s, t) for pair in plan.pairs for s, t in zip(pair, TOKENS)))
    runs = len(jobs) + len(plan.pairs)  # each subject's run and each pair's joint one
    workers = protocol.default_workers(runs) if workers is None else max(1, min(workers, runs))
    paths = _train_all(jobs, plan, output, workers, log)
    backend = load_backend("embedded")
    results: dict = {"pairs": []}
    for n, pair in enumerate(plan.pairs):
        entry, rows = evaluate_pair(backend, pair, [paths[s.name] for s in pair], paths[joint_name(pair)], plan, log)
        results["pairs"].append(entry)
        if n == 0:
            labels, sheet = list(rows), list(rows.values())
    a, b = plan.pairs[0]
    title = (f"left: {TOKENS[0]} {a.class_noun} ({a.name}), right: {TOKENS[1]} {b.class_noun} ({b.name}); "
             "one seed a column")
    fileio.save_image(output / "two_subjects.png", grid_image(sheet, labels, [f"seed {s}" for s in plan.seeds],
                                                              scale=3, title=title))
    results["plan"] = {"pairs": [[s.name for s in p] for p in plan.pairs], "steps": plan.steps,
                       "seeds": list(plan.seeds), "class_images": plan.class_images,
                       "sample_steps": plan.sample_steps}
    results["workers"] = workers
    results["seconds"] = round(time.perf_counter() - t0, 1)
    fileio.write_json(output / "results.json", results)
    return results


def mean_over_pairs(results: dict, method: str) -> Dict[str, float]:
    """A method's numbers averaged over the pairs (subject fidelity over both subjects)."""
    rows = [p[method] for p in results["pairs"]]
    return {"fidelity": float(np.mean([r["fidelity"] for r in rows])),
            **{k: float(np.mean([r[k] for r in rows])) for k in ("leakage", "cross", "prompt")}}


def ratios(results: dict) -> Dict[str, float]:
    """Regional composition and joint training, each ÷ LoRA stacking: below 1 for leakage is what both
    are for."""
    s = mean_over_pairs(results, "stacking")
    out = {}
    for prefix, method in (("", "regional"), ("joint_", "joint")):
        r = mean_over_pairs(results, method)
        out.update({f"{prefix}leak_ratio": r["leakage"] / max(1e-9, s["leakage"]),
                    f"{prefix}fidelity_ratio": r["fidelity"] / s["fidelity"],
                    f"{prefix}prompt_ratio": r["prompt"] / max(1e-9, s["prompt"])})
    return out


def format_tables(results: dict) -> str:
    head = (f"| {'Method':44} | fidelity, 1st ↑ | fidelity, 2nd ↑ | leakage ↓ | cross-similarity ↓ | "
            "prompt fidelity ↑ |")
    rule = f"|{'-' * 46}|----------------:|----------------:|----------:|-------------------:|------------------:|"
    lines = []
    for entry in results["pairs"]:
        lines += [f"{TOKENS[0]} = {entry['pair'][0]} (left), {TOKENS[1]} = {entry['pair'][1]} (right)", head, rule]
        for method in METHODS:
            r = entry[method]
            lines.append(f"| {LABELS[method]:44} | {r['fidelity'][0]:15.3f} | {r['fidelity'][1]:15.3f} | "
                         f"{r['leakage']:9.3f} | {r['cross']:18.3f} | {r['prompt']:17.3f} |")
        lines.append("")
    if len(results["pairs"]) > 1:
        lines += ["All pairs", f"| {'Method':44} | subject fidelity ↑ | leakage ↓ | cross-similarity ↓ | "
                  "prompt fidelity ↑ |", f"|{'-' * 46}|------------------:|----------:|-------------------:|"
                  "------------------:|"]
        for method in METHODS:
            r = mean_over_pairs(results, method)
            if r is not None:
                lines.append(f"| {LABELS[method]:44} | {r['fidelity']:17.3f} | {r['leakage']:9.3f} | "
                             f"{r['cross']:18.3f} | {r['prompt']:17.3f} |")
    return "\n".join(lines).rstrip()


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m dreambooth_core eval --multi [--quick] [--output DIR] [--pairs N] [--steps N] [--workers N]`."""
    p = argparse.ArgumentParser(prog="python -m dreambooth_core eval --multi",
                                description="two subjects in one image, in the toy world: LoRA stacking against "
                                            "regional composition and joint training")
    p.add_argument("--multi", action="store_true", help=argparse.SUPPRESS)  # eval's own flag, passed through
    p.add_argument("--quick", action="store_true", help="one pair, 4 seeds, 200 steps (a few minutes on 2 CPU cores)")
    p.add_argument("--output", default="eval_multi_out", help="folder for results.json, two_subjects.png, the LoRAs")
    p.add_argument("--pairs", type=int, default=None, help="only the first N pairs of subjects")
    p.add_argument("--steps", type=int, default=None,
                   help="DreamBooth steps per subject (default 250, 200 with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="samples per method and pair (default 8, 4 with --quick)")
    p.add_argument("--class-images", type=int, default=None, help="class images per class noun")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--workers", type=int, default=None, help="subjects trained in parallel (default: one per core)")
    args = p.parse_args(argv)
    plan = MultiPlan.quick() if args.quick else MultiPlan()
    if args.pairs:
        plan = replace(plan, pairs=tuple(plan.pairs)[: args.pairs])
    for name in ("steps", "class_images", "sample_steps"):
        if getattr(args, name):
            plan = replace(plan, **{name: getattr(args, name)})
    if args.seeds:
        plan = replace(plan, seeds=tuple(range(args.seeds)))
    output = Path(args.output)
    results = run_multi(output, plan, workers=args.workers)
    print(format_tables(results))
    print(f"picture: {output / 'two_subjects.png'}; results: {output / 'results.json'}")
    r = ratios(results)
    print(" ".join(f"{k}={v:.2f}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
