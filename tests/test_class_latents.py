"""Class samples kept as latents (class_images.cache, for a backend with `class_latents`: a model whose VAE decodes
only a preview, Stable Cascade's stage C): each latents file beside its PNG, checked by its hash, reused, and
trained on as it is (training.cache never encodes the preview)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreambooth_core.backends.base import BackendDefaults, SampleSettings
from dreambooth_core.class_images.cache import ensure_class_images
from dreambooth_core.training.cache import cache_images

SIZE = 32


class LatentBackend(BackendDefaults):
    """Samples whose latents depend only on their seed; a preview of another size; no VAE encoder."""

    class_latents = True

    def __init__(self):
        self.calls = 0

    def fingerprint(self) -> str:
        return "latent-backend"

    def generate(self, prompts, seeds, settings, progress=None, latents=None):
        images = []
        for seed in seeds:
            self.calls += 1
            g = torch.Generator().manual_seed(seed)
            latents.append(torch.randn(4, settings.height // 8, settings.width // 8, generator=g))
            images.append(np.full((settings.height // 4, settings.width // 4, 3), seed % 256, np.uint8))
        return images

    def encode_images(self, pixels):
        raise AssertionError("class samples kept as latents are never encoded again")


def _settings(size=SIZE):
    return SampleSettings(steps=1, guidance=1.0, sampler="euler", width=size, height=size)


def test_samples_are_kept_and_trained_on_as_latents(tmp_path):
    backend = LatentBackend()
    made = ensure_class_images(backend, tmp_path, "a dog", 3, _settings(), seed=10)
    assert made.complete and backend.calls == 3 and len(made.latent_paths) == 3
    entries = json.loads((made.folder / "manifest.json").read_text())["images"]
    assert [e["latent"] for e in entries] == [f"{i:05d}.latent.safetensors" for i in range(3)]

    items = made.load(resolution=SIZE).items
    assert [it.image.size for it in items] == [(SIZE, SIZE)] * 3  # the preview scaled to the training size
    for i, it in enumerate(items):
        expected = torch.randn(4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(10 + i))
        assert torch.equal(it.latent, expected)
    [bucket] = cache_images(backend, items, flip=True)
    assert torch.equal(bucket.latents, torch.stack([it.latent for it in items])) and bucket.flipped is None

    with pytest.raises(ValueError, match="made at 32x32 .* training resolution 64"):
        made.load(resolution=64)


def test_a_damaged_latent_is_made_again_and_the_rest_reused(tmp_path):
    backend = LatentBackend()
    made = ensure_class_images(backend, tmp_path, "a dog", 2, _settings())
    made.latent_paths[1].write_bytes(b"damaged")
    again = ensure_class_images(backend, tmp_path, "a dog", 2, _settings())
    assert (again.reused, again.generated, backend.calls) == (1, 1, 3)
    assert torch.equal(again.load(resolution=SIZE).items[1].latent,
                       torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(1)))
