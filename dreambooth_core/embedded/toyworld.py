"""The toy world: a renderer of captioned scenes with a known ground truth.

The embedded default model is pretrained on these scenes, the demo draws its subject here, and
the evaluation measures samples against it. Every scene is an object (shape, colour, pattern)
on a plain background, optionally with a small second object; because the renderer is ours,
what a sample shows (background colour, object colour, the subject's pattern) can be measured
instead of judged by eye.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    # Never named in pretraining captions: subjects may wear them, prompts do not ask for them.
    "pink": (245, 150, 190),
    "cyan": (40, 200, 210),
    "brown": (130, 80, 40),
}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond")
PATTERNS = ("plain", "striped", "dotted", "checkered", "metallic")
# Two-colour patterns never rendered in pretraining: they make a subject unmistakable.
SUBJECT_PATTERNS = ("diagonal", "target", "split", "spotted", "zigzag")


@dataclass(frozen=True)
class Thing:
    """One object: the class noun is its shape; colour2 is used only by subject patterns."""

    shape: str
    colour: str
    pattern: str = "plain"
    colour2: str | None = None


@dataclass(frozen=True)
class Scene:
    thing: Thing
    background: str
    x: float = 0.0
    y: float = 0.0
    radius: float = 0.6
    angle: float = 0.0
    companion: Thing | None = None
    corner: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Subject:
    """A DreamBooth subject of the toy world: a thing no pretraining scene ever showed."""

    name: str
    thing: Thing

    @property
    def class_noun(self) -> str:
        return self.thing.shape


def _luma(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def rgb_of(colour: str) -> tuple[int, int, int]:
    """A palette name, or '#rrggbb' (used only to teach the VAE every colour)."""
    if colour.startswith("#"):
        return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    return PALETTE[colour]


def shade_of(colour: str) -> tuple[int, int, int]:
    """The second tone of a one-colour pattern: darker, or lighter for dark colours."""
    rgb = rgb_of(colour)
    if _luma(rgb) < 80:
        return tuple(min(255, c + 110) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c * 0.45) for c in rgb)  # type: ignore[return-value]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in object coordinates (unit radius, v pointing down)."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 1.0
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":
        return (v <= 0.6) & (v >= -1.0 + 1.6 * 1.0 / 0.92 * np.abs(u))
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95))
    if shape == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.2
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "star":
        sector = 2 * math.pi / 5
        phi = np.mod(np.arctan2(v, u) + math.pi / 2, sector)
        phi = np.where(phi > sector / 2, sector - phi, phi)
        px, py = r * np.cos(phi), r * np.sin(phi)
        inner = 0.42
        qx, qy = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
        return (qx - 1.0) * py - qy * (px - 1.0) >= 0
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def _paint(thing: Thing, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """RGB float image of the thing's surface in object coordinates."""
    base = np.array(rgb_of(thing.colour), dtype=np.float32)
    second = np.array(rgb_of(thing.colour2) if thing.colour2 else shade_of(thing.colour), np.float32)
    p = thing.pattern
    if p == "plain":
        alt = np.zeros(u.shape, bool)
    elif p == "striped":
        alt = np.sin(v * math.pi * 3.2) > 0
    elif p == "dotted":
        alt = (np.mod(u * 2.6, 1) - 0.5) ** 2 + (np.mod(v * 2.6, 1) - 0.5) ** 2 < 0.07
    elif p == "checkered":
        alt = (np.floor(u * 2.4) + np.floor(v * 2.4)) % 2 == 0
    elif p == "metallic":
        light = np.clip(0.55 + 0.45 * (0.5 - 0.5 * (u + v) / 1.4), 0.2, 1.0)[..., None]
        glint = np.exp(-((u + 0.35) ** 2 + (v + 0.4) ** 2) / 0.04)[..., None]
        return base * light * 0.9 + 255 * glint * 0.8
    elif p == "diagonal":
        alt = np.sin((u + v) * math.pi * 2.2) > 0
    elif p == "target":
        alt = np.mod(np.hypot(u, v) * 3.0, 1) < 0.5
    elif p == "split":
        alt = u > 0
    elif p == "spotted":
        alt = (np.mod(u * 1.8 + 0.25, 1) - 0.5) ** 2 + (np.mod(v * 1.8 + 0.25, 1) - 0.5) ** 2 < 0.05
    elif p == "zigzag":
        alt = np.sin(v * math.pi * 2.5 + 1.6 * np.abs(np.mod(u * 2.5, 2) - 1) * math.pi) > 0
    else:
        raise ValueError(f"unknown pattern {p!r}; known: {', '.join(PATTERNS + SUBJECT_PATTERNS)}")
    return np.where(alt[..., None], second, base)


def render(scene: Scene, size: int = 32, supersample: int = 3) -> np.ndarray:
    """Render a scene as uint8 HxWx3 (anti-aliased by supersampling)."""
    n = size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
    gx, gy = np.meshgrid(coords, coords)
    img = np.empty((n, n, 3), np.float32)
    img[:] = np.array(rgb_of(scene.background), np.float32)

    def draw(thing: Thing, cx: float, cy: float, radius: float, angle: float) -> None:
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = (gx - cx) / radius, (gy - cy) / radius
        u, v = ca * dx + sa * dy, -sa * dx + ca * dy
        mask = _shape_mask(thing.shape, u, v)
        if mask.any():
            img[mask] = _paint(thing, u[mask], v[mask])

    draw(scene.thing, scene.x, scene.y, scene.radius, scene.angle)
    if scene.companion is not None:
        sx, sy = ((-1, -1), (1, -1), (-1, 1), (1, 1))[scene.corner % 4]
        draw(scene.companion, 0.74 * sx, 0.74 * sy, 0.2, 0.0)
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(thing: Thing, *, colour: bool = True, pattern: bool = True) -> str:
    words = []
    if colour:
        words.append(thing.colour)
    if pattern and thing.pattern != "plain":
        words.append(thing.pattern)
    words.append(thing.shape)
    return " ".join(words)


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """Caption a pretraining scene; with an rng, attributes are dropped at random so the model
    also learns what a bare class noun ('a photo of a star') looks like across the world."""
    drop = (lambda p: rng.random() < p) if rng is not None else (lambda p: False)
    text = describe(scene.thing, colour=not drop(0.2), pattern=not drop(0.2))
    text = f"a photo of {_article(text)} {text}"
    if scene.companion is not None and not drop(0.2):
        text += f" next to a small {describe(scene.companion, pattern=False)}"
    if not drop(0.3):
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


def random_thing(rng: random.Random, shapes: Sequence[str] = SHAPES) -> Thing:
    return Thing(rng.choice(list(shapes)), rng.choice(COLOURS), rng.choice(PATTERNS))


def random_view(rng: random.Random, thing: Thing, background: str | None = None,
                companion: Thing | None = None) -> Scene:
    """A random placement of a thing: the 'views' that instance photos of a subject would be."""
    if background is None:
        background = rng.choice([c for c in COLOURS if c != thing.colour and c != thing.colour2])
    return Scene(
        thing=thing,
        background=background,
        x=rng.uniform(-0.12, 0.12),
        y=rng.uniform(-0.12, 0.12),
        radius=rng.uniform(0.5, 0.72),
        angle=0.0 if thing.shape in ("circle", "ring") else rng.uniform(-0.35, 0.35),
        companion=companion,
        corner=rng.randrange(4),
    )


def random_scene(rng: random.Random) -> Scene:
    thing = random_thing(rng)
    companion = None
    if rng.random() < 0.25:
        companion = Thing(rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != thing.colour]))
    return random_view(rng, thing, companion=companion)


def pretraining_batch(rng: random.Random, n: int, size: int = 32, drop_caption: float = 0.1,
                      bare: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """Rendered scenes and captions; a share `bare` of the captions is the class noun alone ('a photo
    of a star'), the prompt DreamBooth's class images are made from (without it such a caption
    comes up only when every attribute happens to be dropped, ~1 % of the time)."""
    images, captions = [], []
    for _ in range(n):
        scene = random_scene(rng)
        images.append(render(scene, size))
        if rng.random() < drop_caption:
            captions.append("")
        elif bare and rng.random() < bare:
            captions.append(f"a photo of {_article(scene.thing.shape)} {scene.thing.shape}")
        else:
            captions.append(caption(scene, rng))
    return np.stack(images), captions


# --- subjects ---------------------------------------------------------------------------------

# Half pink, half cyan: two colours pretraining never names, in a pattern bold enough for a
# 32-pixel model to draw, so the subject is unmistakable in the demo's grid.
DEMO_SUBJECT = Subject("demo", Thing("circle", "pink", "split", "cyan"))

EVAL_SUBJECTS: tuple[Subject, ...] = (
    Subject("diagonal-star", Thing("star", "pink", "diagonal", "cyan")),
    Subject("split-heart", Thing("heart", "cyan", "split", "orange")),
    Subject("target-circle", Thing("circle", "brown", "target", "yellow")),
    Subject("zigzag-square", Thing("square", "yellow", "zigzag", "purple")),
    Subject("spotted-triangle", Thing("triangle", "green", "spotted", "pink")),
    Subject("diagonal-diamond", Thing("diamond", "orange", "diagonal", "blue")),
    Subject("target-cross", Thing("cross", "pink", "target", "black")),
    Subject("spotted-ring", Thing("ring", "blue", "spotted", "yellow")),
)


def subject_views(subject: Subject, n: int, seed: int, size: int = 32) -> list[np.ndarray]:
    """n instance photos of the subject, each on its own background, as a user would shoot them."""
    rng = random.Random(seed)
    backgrounds = [c for c in COLOURS if c not in (subject.thing.colour, subject.thing.colour2)]
    rng.shuffle(backgrounds)
    return [render(random_view(rng, subject.thing, backgrounds[i % len(backgrounds)]), size)
            for i in range(n)]


# --- measurement ------------------------------------------------------------------------------

_NAMED = np.array([PALETTE[c] for c in PALETTE], np.float32)
_NAMES = list(PALETTE)


def nearest_colour(rgb: np.ndarray, among: Sequence[str] = COLOURS) -> str:
    idx = [_NAMES.index(c) for c in among]
    d = ((_NAMED[idx] - np.asarray(rgb, np.float32)) ** 2).sum(-1)
    return among[int(d.argmin())]


def background_colour(image: np.ndarray) -> str:
    """The background colour read off the image border."""
    border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3),
                             image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)])
    return nearest_colour(np.median(border, axis=0))


def object_mask(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels of the central region that differ clearly from the background."""
    h, w, _ = image.shape
    border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3)])
    bg = np.median(border, axis=0).astype(np.float32)
    dist = np.sqrt(((image.astype(np.float32) - bg) ** 2).sum(-1))
    mask = dist > threshold
    yy, xx = np.mgrid[0:h, 0:w]
    central = (np.abs(xx - w / 2) < w * 0.36) & (np.abs(yy - h / 2) < h * 0.36)
    return mask & central


def object_colour(image: np.ndarray, among: Sequence[str] = COLOURS) -> str | None:
    """The main object's colour: most frequent palette colour among its pixels, counting a
    one-colour pattern's second tone as its colour."""
    mask = object_mask(image)
    if mask.sum() < 12:
        return None
    pixels = image[mask].astype(np.float32)
    tones = [(c, np.array(PALETTE[c], np.float32)) for c in among]
    tones += [(c, np.array(shade_of(c), np.float32)) for c in among]
    d = np.stack([((pixels - t) ** 2).sum(-1) for _, t in tones], axis=1)
    votes: dict[str, int] = {}
    for i in d.argmin(1):
        votes[tones[i][0]] = votes.get(tones[i][0], 0) + 1
    return max(votes, key=votes.get)


@dataclass
class PromptCheck:
    """What a prompt asks for that can be read off a render."""

    prompt: str
    background: str | None = None
    colour: str | None = None
    shape: str | None = None
    extra: dict = field(default_factory=dict)


def probe_prompts(n: int, seed: int = 0) -> list[PromptCheck]:
    """Prompts of the form 'a photo of a red square on a green background', for measuring how
    well a model follows background and object colour."""
    rng = random.Random(seed)
    checks = []
    for _ in range(n):
        shape = rng.choice(SHAPES)
        colour = rng.choice(COLOURS)
        bg = rng.choice([c for c in COLOURS if c != colour])
        checks.append(PromptCheck(f"a photo of {_article(colour)} {colour} {shape} on "
                                  f"{_article(bg)} {bg} background", background=bg, colour=colour,
                                  shape=shape))
    return checks
