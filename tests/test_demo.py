"""`python -m dreambooth_core demo` writes everything the quickstart promises, its trained column
shows the subject where the base column does not, and the plain class prompt stays free of it
(the demo's own run, ~1 min on 2 cores)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import subject_share
from dreambooth_core.embedded import model as embedded, toyworld
from dreambooth_core.cli.main import main
from dreambooth_core.cli.demo import DEMO_SEEDS, DEMO_SETTINGS, run_demo
from dreambooth_core.adapters import read_lora_file

pytestmark = pytest.mark.skipif(not (embedded.EMBEDDED_MODEL_DIR / "model_index.json").is_file(),
                                reason="embedded model not built")

STEPS = DEMO_SETTINGS["steps"]  # the demo's own: at half of it the subject is not bound yet


def test_cli_demo_writes_its_outputs(tmp_path, monkeypatch):
    import dreambooth_core.cli.demo as demo

    calls = {}

    def fake(output, steps=None, log=print):  # the CLI's wiring only; the run itself is tested below
        calls.update(output=output, steps=steps)

    monkeypatch.setattr(demo, "run_demo", fake)
    assert main(["demo", "--output", str(tmp_path / "d"), "--steps", "7"]) == 0
    assert calls == {"output": tmp_path / "d", "steps": 7}


def test_demo_run_shows_the_subject_after_training_and_not_before(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, log=lambda *_: None)

    for name in ("grid.png", "loss.png", "instance_images.png", "config.json", "demo.json",
                 "demo_subject_lora.safetensors"):
        assert (out / name).is_file(), name
    run = json.loads((out / "config.json").read_text())
    assert run["steps_done"] == STEPS
    assert run["config"]["prior"] is True and run["config"]["class_noun"] == "circle"
    tensors, meta = read_lora_file(out / "demo_subject_lora.safetensors")
    assert tensors and meta["dreambooth_token"] == "sks" and meta["dreambooth_class_noun"] == "circle"
    assert meta["dreambooth_prior_preservation"] == "true"
    n_rows = len(result["prompts"])
    grid = Image.open(out / "grid.png")
    assert grid.height > n_rows * 32 and grid.width > 2 * len(DEMO_SEEDS) * 32

    # Every prompt but the plain class one names the identifier: there the subject must appear.
    n = len(DEMO_SEEDS)
    with_token = [i for i, p in enumerate(result["prompts"]) if "sks" in p]
    before = [im for i in with_token for im in result["before"][i * n:(i + 1) * n]]
    after = [im for i in with_token for im in result["after"][i * n:(i + 1) * n]]
    base, trained = subject_share(before, toyworld.DEMO_SUBJECT), subject_share(after, toyworld.DEMO_SUBJECT)
    # Measured on the shipped model: 0.01 -> 0.80 (an untrained or broken trainer leaves it unchanged).
    assert base < 0.1, (base, trained)
    assert trained > 0.5, (base, trained)
    # Prior preservation: the plain class prompt does not turn into the subject (measured 0.00).
    plain = [i for i, p in enumerate(result["prompts"]) if "sks" not in p]
    assert plain, "the demo shows the plain class prompt"
    leak = subject_share([im for i in plain for im in result["after"][i * n:(i + 1) * n]], toyworld.DEMO_SUBJECT)
    assert leak < 0.1, leak
