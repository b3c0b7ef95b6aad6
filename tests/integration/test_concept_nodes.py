"""Several subjects in one training run, in the real ComfyUI server over its HTTP API (issue 38 item 3):
two chained DreamBooth Dataset nodes, each class with its own Class Images, one Train node, one LoRA whose
metadata names both subjects; a clashing identifier refused on the node; the example workflow (without the
new inputs wired) still runs through the same server's graph validation in test_server_workflow.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_server_workflow import object_info, run, server, subgraph, workflow  # noqa: F401 (fixtures)

PAIR = "it_pair"


@pytest.fixture(scope="module")
def cat_photos(server):  # noqa: F811 (the imported fixture)
    from PIL import Image

    folder = server.base / "input" / "cat"
    folder.mkdir(exist_ok=True)
    for i in range(2):
        img = np.full((64, 64, 3), 200 - 50 * i, np.uint8)
        img[20:44, 8:56] = (30, 30, 200)
        Image.fromarray(img).save(folder / f"cat_{i}.png")
    return folder


def _pair_graph(workflow, cat_token="ohwx") -> dict:  # noqa: F811
    """The example's checkpoint, dog dataset and class images, a chained cat dataset with its own class
    images, and Train on the chain (2 steps)."""
    graph = subgraph(workflow, ("1", "2", "4", "6"))
    graph["2"]["inputs"].update(folder="dog", resolution=64)
    for key in ("repeats", "loss_weight"):  # as an older workflow saved it: the new widgets take their defaults
        graph["2"]["inputs"].pop(key, None)
    graph["4"]["inputs"].update(count=1, steps=1, sampler_name="euler", scheduler="normal", resolution=64)
    graph["5"] = {"class_type": "DreamBoothClassImages",
                  "inputs": dict(graph["4"]["inputs"], class_prompt="a photo of a cat")}
    graph["3"] = {"class_type": "DreamBoothDataset",
                  "inputs": dict(graph["2"]["inputs"], folder="cat", token=cat_token, class_noun="cat",
                                 dataset=["2", 0], class_images=["5", 0], repeats=2, loss_weight=0.5)}
    graph["6"]["inputs"].update(dataset=["3", 0], class_images=["4", 0], rank=2, steps=2, learning_rate=5e-3,
                                save_name=PAIR, caption_dropout=0.0, preview_every=0)
    graph["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 3]}}  # an output: the loss curve
    return graph


def test_two_chained_subjects_train_into_one_lora_that_names_both(server, workflow, cat_photos):  # noqa: F811
    entry = run(server, _pair_graph(workflow))
    lora_path = Path(entry["outputs"]["6"]["lora_path"][0])
    assert lora_path == server.base / "models" / "loras" / f"{PAIR}.safetensors"
    from safetensors import safe_open

    with safe_open(str(lora_path), framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.trigger_phrase"] == "sks dog, ohwx cat"
    assert json.loads(meta["ss_tag_frequency"]) == {"1_sks dog": {"sks dog": 3}, "2_ohwx cat": {"ohwx cat": 2}}
    subjects = json.loads(meta["dreambooth_subjects"])
    assert [(s["phrase"], s["images"], s["repeats"], s["loss_weight"]) for s in subjects] == [
        ("sks dog", 3, 1, 1.0), ("ohwx cat", 2, 2, 0.5)]
    run_dir = server.base / "output" / "dreambooth" / PAIR
    history = json.loads((run_dir / "loss.json").read_text())
    assert len(history) == 2 and all(h["prior_loss"] is not None for h in history), "each class's prior trained"
    sets = {p.parent for p in (server.base / "output" / "dreambooth_class_images").rglob("*.png")}
    assert len(sets) >= 2, "a class-image set per class"
    listed = {s["name"]: s for s in server.get("/dreambooth/subjects")["subjects"]}
    assert listed[f"{PAIR}.safetensors"]["phrases"] == ["sks dog", "ohwx cat"]
    assert listed[f"{PAIR}.safetensors"]["phrase"] == "sks dog, ohwx cat"


def test_a_chained_subject_with_a_clashing_identifier_is_refused(server, workflow, cat_photos):  # noqa: F811
    graph = _pair_graph(workflow, cat_token="sks")
    graph["6"]["inputs"]["save_name"] = "it_clash"
    entry = server.wait(server.queue(graph), timeout=300)
    assert entry["status"]["status_str"] == "error"
    failed = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert failed and failed[0]["node_id"] == "3", failed
    assert "identifier 'sks' is used by subject 1 ('sks dog') and subject 2 ('sks cat')" in \
        failed[0]["exception_message"]
    assert not (server.base / "models" / "loras" / "it_clash.safetensors").exists()


def test_train_s_class_images_serve_subjects_of_one_class_only(server, workflow, cat_photos):  # noqa: F811
    graph = _pair_graph(workflow)
    del graph["3"]["inputs"]["class_images"]  # the cat would take the dog's class images
    graph["6"]["inputs"]["save_name"] = "it_one_set"
    entry = server.wait(server.queue(graph), timeout=300)
    assert entry["status"]["status_str"] == "error"
    failed = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert failed and failed[0]["node_id"] == "6", failed
    assert "class_images ('a photo of a dog') would serve subjects of several classes (cat, dog)" in \
        failed[0]["exception_message"]
    assert not (server.base / "models" / "loras" / "it_one_set.safetensors").exists()
