"""Prompt sets that show what DreamBooth is for, and grids of the results.

The kinds follow the paper's applications: recontextualization, art renditions, property
modification (colour, material), accessories, class hybrids, plus product shots for shops.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..backends.base import Backend, SampleSettings
from ..plots import grid_image

PROMPT_SETS: Dict[str, List[str]] = {
    "recontextualization": [
        "a photo of {token} {class} on the beach",
        "a photo of {token} {class} in the snow",
        "a photo of {token} {class} in a city street at night",
        "a photo of {token} {class} on top of a wooden table",
    ],
    "art_renditions": [
        "a painting of {token} {class} in the style of Vincent van Gogh",
        "a watercolor painting of {token} {class}",
        "a pencil sketch of {token} {class}",
    ],
    "property_modification": [
        "a photo of a red {token} {class}",
        "a photo of a {token} {class} made of gold",
        "a photo of a transparent glass {token} {class}",
    ],
    "accessories": [
        "a photo of {token} {class} wearing a santa hat",
        "a photo of {token} {class} with a red bow",
    ],
    "class_hybrids": [
        "a photo of a cross between {token} {class} and a panda",
        "a photo of a cross between {token} {class} and a teddy bear",
    ],
    "product_shots": [
        "a product photo of {token} {class} on a white background, studio lighting",
        "a photo of {token} {class} on a shelf in a shop",
    ],
}

# The embedded model knows only the toy world's vocabulary; the same kinds, in its words.
TOY_PROMPT_SETS: Dict[str, List[str]] = {
    "identity": ["a photo of {token} {class}"],
    "recontextualization": ["a photo of {token} {class} on a blue background",
                            "a photo of {token} {class} on a white background"],
    "property_modification": ["a photo of a yellow {token} {class}",
                              "a photo of a metallic {token} {class}"],
    "accessories": ["a photo of {token} {class} next to a small white circle"],
    "class_hybrids": ["a photo of {token} heart", "a photo of {token} square"],
    "class_prior": ["a photo of a {class}"],
}


def fill(template: str, token: str, class_noun: str) -> str:
    return template.replace("{token}", token).replace("{class}", class_noun)


SUBJECT_PLACEHOLDER = re.compile(r"\{subject(?:_(\d+))?\}")


def fill_subjects(text: str, subjects: Sequence[str]) -> str:
    """`{subject}` (or `{subject_1}`) -> the first phrase, `{subject_2}` -> the second, ... A text with no
    placeholder gets the phrases in front ("sks dog, a photo on a beach"), so an existing prompt works
    unchanged. A placeholder without its phrase is an error naming it."""
    phrases = [s.strip() for s in subjects]

    def phrase(match) -> str:
        n = int(match.group(1) or 1)
        if not 1 <= n <= len(phrases) or not phrases[n - 1]:
            raise ValueError(f"text uses {match.group(0)} but subject_{n} has no phrase: connect a Load Subject's "
                             f"subject output to subject_{n}, or remove the placeholder")
        return phrases[n - 1]

    if SUBJECT_PLACEHOLDER.search(text):
        return SUBJECT_PLACEHOLDER.sub(phrase, text)
    return ", ".join([p for p in phrases if p] + ([text.strip()] if text.strip() else []))


def prompt_set(name: str, token: str, class_noun: str, toy: bool = False) -> List[str]:
    """Prompts of one kind (or "all"), filled with the identifier and class noun."""
    sets = TOY_PROMPT_SETS if toy else PROMPT_SETS
    if name == "all":
        templates = [t for ts in sets.values() for t in ts]
    elif name in sets:
        templates = sets[name]
    else:
        raise ValueError(f"prompt set {name!r}: choose one of {', '.join(['all', *sets])}")
    return [fill(t, token, class_noun) for t in templates]


def sample_grid(backend: Backend, prompts: Sequence[str], seeds: Sequence[int], settings: SampleSettings,
                scale: int = 1, title: Optional[str] = None, progress=None):
    """One row per prompt, one column per seed; returns (PIL grid, images by row)."""
    flat_prompts = [p for p in prompts for _ in seeds]
    flat_seeds = [s for _ in prompts for s in seeds]
    images = backend.generate(flat_prompts, flat_seeds, settings, progress=progress)
    rows = [images[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]
    grid = grid_image(rows, row_labels=list(prompts), col_labels=[f"seed {s}" for s in seeds], scale=scale,
                      title=title)
    return grid, rows


def side_by_side(before: Sequence[Sequence[np.ndarray]], after: Sequence[Sequence[np.ndarray]],
                 prompts: Sequence[str], scale: int = 1, title: Optional[str] = None):
    """Rows of base-model images next to the trained model's, for the same prompts and seeds."""
    n = len(before[0])
    rows = [list(b) + list(a) for b, a in zip(before, after)]
    cols = [f"base {i + 1}" for i in range(n)] + [f"trained {i + 1}" for i in range(n)]
    return grid_image(rows, row_labels=list(prompts), col_labels=cols, scale=scale, title=title)
