"""The eval protocol gives the same numbers whether its subjects run in one process or several."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreambooth_core.embedded import model as embedded
from dreambooth_core.embedded import toyworld as tw
from dreambooth_core.evaluation.protocol import Plan, run_eval

pytestmark = pytest.mark.skipif(not (embedded.EMBEDDED_MODEL_DIR / "model_index.json").is_file(),
                                reason="embedded model not built")

# Four sampling steps: the runs must agree, not look good (a fifth of the protocol's sampling time).
PLAN = Plan(subjects=tw.EVAL_SUBJECTS[1:3], steps=4, seeds=(0,), class_images=2, instance_images=2, sample_steps=4,
            class_samples=2)


def _flat(per_subject: dict) -> dict:
    """One list per metric, the prompt kinds' lists beside the others."""
    flat = {k: v for k, v in per_subject.items() if k != "by_kind"}
    flat.update({f"kind {k}": v for k, v in per_subject["by_kind"].items()})
    return flat


def test_parallel_subjects_give_the_serial_results_in_the_plan_order(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each worker uses, so both runs do the same arithmetic
    try:
        serial = run_eval(tmp_path / "serial", PLAN, log=lambda *_: None, workers=1)
    finally:
        torch.set_num_threads(threads)
    seen = []
    parallel = run_eval(tmp_path / "parallel", PLAN, log=seen.append, workers=2)

    assert parallel["workers"] == 2 and serial["workers"] == 1
    assert parallel["subjects"] == serial["subjects"] == [s.name for s in PLAN.subjects]
    assert len(seen) == 2 and {line.split("] ")[1].split(":")[0] for line in seen} == set(parallel["subjects"])
    for model in ("base", "prior", "no_prior"):
        flat, parallel_flat = _flat(serial["per_subject"][model]), _flat(parallel["per_subject"][model])
        assert {k for k in flat if k.startswith("kind ")} == {
            "kind recontextualization", "kind property_modification", "kind accessories", "kind class_hybrid"}
        for metric, values in flat.items():
            assert len(values) == 2
            np.testing.assert_allclose(parallel_flat[metric], values, atol=1e-6,
                                       err_msg=f"{model} {metric}")
    assert (tmp_path / "parallel" / "samples.png").is_file()


def test_cli_flags_reach_the_plan_and_a_frozen_text_encoder_gets_no_lora(tmp_path, monkeypatch):
    from dataclasses import replace

    from dreambooth_core.cli.main import main
    from dreambooth_core.evaluation import protocol
    from dreambooth_core.adapters import read_lora_file

    plans = []
    real = protocol.run_eval

    def capture(output, plan, **kwargs):
        plans.append(plan)
        return real(output, replace(PLAN, subjects=PLAN.subjects[:1], steps=plan.steps,
                                    train_text_encoder=plan.train_text_encoder,
                                    caption_dropout=plan.caption_dropout), **kwargs)

    monkeypatch.setattr(protocol, "run_eval", capture)
    assert main(["eval", "--quick", "--steps", "3", "--frozen-text-encoder", "--masked-loss", "--workers", "1",
                 "--caption-dropout", "0.1", "--output", str(tmp_path)]) == 0
    assert plans[0].steps == 3 and plans[0].train_text_encoder is False and plans[0].seeds == Plan.quick().seeds
    assert plans[0].masked_loss is True and Plan().masked_loss is False
    assert plans[0].caption_dropout == 0.1 and Plan().caption_dropout == 0.0
    configs = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/config.json")]
    assert len(configs) == 2 and all(c["config"]["caption_dropout"] == 0.1 for c in configs)
    for lora in (tmp_path / "runs").glob("*/*.safetensors"):
        tensors, _ = read_lora_file(lora)
        assert tensors and not any(k.startswith("lora_te") for k in tensors), lora
    assert len(list((tmp_path / "runs").glob("*/*.safetensors"))) == 2


def test_pres_is_read_off_fresh_class_samples_not_the_class_images_prior_preservation_trained_on(tmp_path):
    """A prior-preservation run is trained to reproduce its class images: PRES measured on those very
    images (the class prompt at their seeds) would reward memorising them, not keeping the class."""
    from PIL import Image

    from dreambooth_core.backends.base import SampleSettings
    from dreambooth_core.backends.diffusers_loading import load_backend
    from dreambooth_core.evaluation.protocol import _sample_all, class_prompt, subject_prompts
    from dreambooth_core.class_images.cache import ensure_class_images

    backend = load_backend("embedded")
    subject = PLAN.subjects[0]
    settings = SampleSettings(width=32, height=32, steps=4, guidance=4.0)
    for plan in (Plan(), Plan.quick()):  # PRES gets more samples than any other prompt
        assert plan.class_samples >= 2 * len(plan.seeds)
    class_samples = 3
    class_set = ensure_class_images(backend, tmp_path, class_prompt(subject), 4, settings, seed=0)
    trained_on = [np.asarray(Image.open(path).convert("RGB")) for path in class_set.paths]
    _, identity, klass, rows = _sample_all(backend, subject, subject_prompts(subject), (0, 1), settings, class_samples)

    assert len(identity) == 2 and len(klass) == class_samples and rows[-1] is klass
    assert all(im.shape == (32, 32, 3) for im in klass)
    for sample in klass:
        assert all(np.abs(sample.astype(int) - image.astype(int)).max() > 8 for image in trained_on)
    # the samples differ from one another too: each is a fresh draw of the class
    assert all(np.abs(a.astype(int) - b.astype(int)).max() > 8 for i, a in enumerate(klass) for b in klass[i + 1:])
