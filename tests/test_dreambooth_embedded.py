"""DreamBooth on the embedded model does what the paper says, measured on the toy world.

- Training binds the subject to the identifier: held-out photos of the subject become much
  easier to denoise under "a photo of sks <class>", and samples of that prompt show the
  subject's colours, which the base model never draws.
- Prior preservation keeps the plain class prompt close to what the base model drew (without
  guidance; with it, the untrained empty prompt's drift shows, see the xfail below).
- The text encoder tells the identifier apart from the class prompt.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import conftest
from dreambooth_core.embedded import model as embedded, toyworld
from dreambooth_core.training import objective
from dreambooth_core.backends.base import SampleSettings
from dreambooth_core.config import TrainConfig
from dreambooth_core.dataset import prepare_dataset
from dreambooth_core.evaluation import metrics
from dreambooth_core.class_images.cache import ensure_class_images
from dreambooth_core.training.trainer import train

pytestmark = [pytest.mark.slow,  # the embedded model trained for hundreds of steps: tools/test.sh runs these apart
              pytest.mark.skipif(not (embedded.EMBEDDED_MODEL_DIR / "model_index.json").is_file(),
                                 reason="embedded model not built")]

SUBJECT = toyworld.DEMO_SUBJECT  # a pink/cyan split circle: colours no pretraining caption names
TOKEN = "sks"
RES = embedded.RESOLUTION
SETTINGS = SampleSettings(steps=15, guidance=4.0, width=RES, height=RES)
SEEDS = list(range(100, 106))


def load():
    from dreambooth_core.backends.diffusers_loading import load_backend

    return load_backend("embedded")


def subject_share(images) -> float:
    return conftest.subject_share(images, SUBJECT, min_pixels=12)


@torch.no_grad()
def denoising_loss(backend, images, prompt: str) -> float:
    pixels = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    latents = backend.encode_images(pixels)
    g = torch.Generator().manual_seed(0)
    losses = []
    cond = backend.encode_text([prompt] * len(images), size=(RES, RES))
    for t in (100, 300, 500, 700):
        noise = torch.randn(latents.shape, generator=g)
        ts = torch.full((len(images),), t)
        batch = objective.make_batch(latents, noise, ts, backend.alphas_cumprod, backend.prediction_type)
        pred = backend.predict(batch.noisy, ts, cond)
        losses.append(torch.mean((pred - batch.target) ** 2).item())
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    base = load()
    views = toyworld.subject_views(SUBJECT, 5, seed=3)
    held_out = toyworld.subject_views(SUBJECT, 4, seed=99)
    data = prepare_dataset(views, token=TOKEN, class_noun=SUBJECT.class_noun, resolution=RES)
    class_prompt = f"a photo of a {SUBJECT.class_noun}"
    classes = ensure_class_images(base, root / "class", class_prompt, 32, SETTINGS)
    class_items = classes.load(resolution=RES).items
    instance_prompt = f"a photo of {TOKEN} {SUBJECT.class_noun}"
    before = {
        "loss": denoising_loss(base, held_out, instance_prompt),
        "subject": base.generate([instance_prompt] * len(SEEDS), SEEDS, SETTINGS),
        "class": base.generate([class_prompt] * len(SEEDS), SEEDS, SETTINGS),
    }
    return dict(root=root, data=data, class_items=class_items, held_out=held_out, before=before,
                instance_prompt=instance_prompt, class_prompt=class_prompt)


def run(setup, prior: bool, name: str):
    backend = load()
    config = TrainConfig(token=TOKEN, class_noun=SUBJECT.class_noun, steps=300, rank=8, lora_conv=True,
                         learning_rate=2e-3, train_text_encoder=True, batch_size=2, prior=prior, offset_noise=0.1, seed=0,
                         output_dir=str(setup["root"] / name))
    train(backend, config, setup["data"].items, setup["class_items"] if prior else None)
    return backend


@pytest.fixture(scope="module")
def with_prior(setup):
    return run(setup, True, "prior")


@pytest.fixture(scope="module")
def without_prior(setup):
    return run(setup, False, "no_prior")


def test_training_binds_the_subject_to_the_identifier(setup, with_prior):
    after_loss = denoising_loss(with_prior, setup["held_out"], setup["instance_prompt"])
    # Margins measured on the shipped model (0.33x, share 0.16 -> 0.87, fidelity +0.28); an
    # untrained or broken trainer gives 1.0x, +0, +0.
    assert after_loss < 0.5 * setup["before"]["loss"], (after_loss, setup["before"]["loss"])

    after = with_prior.generate([setup["instance_prompt"]] * len(SEEDS), SEEDS, SETTINGS)
    base_share, trained_share = subject_share(setup["before"]["subject"]), subject_share(after)
    assert base_share < 0.25, "the base model has never seen the subject's colours"
    assert trained_share > base_share + 0.4, (base_share, trained_share)

    # The eval protocol's subject-fidelity metric separates the trained subject from the base model.
    ref = metrics.subject_reference(SUBJECT, size=RES)
    base_fid, trained_fid = metrics.subject_fidelity(setup["before"]["subject"], ref), metrics.subject_fidelity(after, ref)
    assert trained_fid > base_fid + 0.15, (base_fid, trained_fid)


def test_masked_loss_learns_the_subject_from_its_pixels_alone(setup):
    """With subject masks only the object's pixels are in the loss; the subject is still bound to
    the identifier, as firmly as on the whole photos (measured: share 0.97 masked, 0.91 unmasked, base 0.01)."""
    from dreambooth_core.evaluation.protocol import subject_masks

    views = toyworld.subject_views(SUBJECT, 5, seed=3)
    data = prepare_dataset(views, token=TOKEN, class_noun=SUBJECT.class_noun, resolution=RES,
                           masks=subject_masks(views))
    assert all(0.05 < np.asarray(it.mask).mean() / 255 < 0.6 for it in data.items)
    backend = load()
    config = TrainConfig(token=TOKEN, class_noun=SUBJECT.class_noun, steps=150, rank=8, lora_conv=True,
                         learning_rate=2e-3, train_text_encoder=True, batch_size=2, prior=False, offset_noise=0.1,
                         seed=0, output_dir=str(setup["root"] / "masked"))
    train(backend, config, data.items)
    after = backend.generate([setup["instance_prompt"]] * len(SEEDS), SEEDS, SETTINGS)
    assert subject_share(after) > subject_share(setup["before"]["subject"]) + 0.5


NO_GUIDANCE = SampleSettings(steps=15, guidance=1.0, width=RES, height=RES)
CLASS_SEEDS = list(range(300, 312))


def test_prior_preservation_keeps_the_class_close_to_the_base_model(setup, with_prior, without_prior):
    def unguided_class(backend):
        return backend.generate([setup["class_prompt"]] * len(CLASS_SEEDS), CLASS_SEEDS, NO_GUIDANCE)

    # The class as the conditional model draws it (no classifier-free guidance): mean similarity of
    # its samples to the centre of the base model's own, same seeds.
    centre = np.mean([metrics.descriptor(im) for im in unguided_class(load())], axis=0)
    centre /= np.linalg.norm(centre)

    def likeness(backend) -> float:
        return float(np.mean([metrics.descriptor(im) @ centre for im in unguided_class(backend)]))

    def leak(backend) -> float:
        return subject_share(backend.generate([setup["class_prompt"]] * len(SEEDS), SEEDS, SETTINGS))

    # Measured: 0.86 with prior preservation, 0.80 without (the base model's own samples: 0.88).
    assert likeness(with_prior) > likeness(without_prior) + 0.03
    # Measured: 0.00 with prior preservation, 0.88 without (the class collapsed onto the subject).
    kept, collapsed = leak(with_prior), leak(without_prior)
    assert kept < 0.5 * collapsed, (kept, collapsed)


@pytest.mark.xfail(strict=True, reason="known: training also moves the unconditional prediction (the empty prompt) "
                                       "towards the subject, which prior preservation does not train, so guidance's "
                                       "cond - uncond pushes class samples away from the subject (dark blobs); "
                                       "measured 67.9 with prior vs 62.3 without")
def test_prior_preservation_keeps_guided_class_samples_where_the_base_model_drew_them(setup, with_prior,
                                                                                       without_prior):
    base = np.stack(setup["before"]["class"]).astype(np.float32)

    def drift(backend) -> float:
        images = np.stack(backend.generate([setup["class_prompt"]] * len(SEEDS), SEEDS, SETTINGS))
        return float(np.abs(images.astype(np.float32) - base).mean())

    assert drift(with_prior) < drift(without_prior)


def test_the_text_encoder_carries_an_identifier_it_never_saw():
    """DreamBooth needs 'a photo of sks star' to differ from 'a photo of a star' (the class prompt
    that prior preservation keeps); a text encoder that ignores unseen words cannot tell them apart,
    and the prior then pulls the subject back (tools/pretrain_toy_model.py: teach_new_words)."""
    backend = load()

    def encoding(prompt: str) -> torch.Tensor:
        cond = backend.encode_text([prompt], size=(RES, RES))
        return next(iter(cond.values()))[0].float()

    plain = encoding("a photo of a star")
    colour = (encoding("a photo of a red star") - plain).norm()
    for word in ("sks", "ohwx"):
        assert (encoding(f"a photo of {word} star") - plain).norm() > 0.15 * colour, word
    sks = encoding("a photo of sks star")
    assert (sks - encoding("a photo of ohwx star")).norm() > 0.15 * colour
    # and the class noun still says what it did: 'sks star' is a star, not some other shape
    assert (sks - plain).norm() < 0.5 * (sks - encoding("a photo of a circle")).norm()
