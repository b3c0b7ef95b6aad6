"""example_workflows/two_subjects.json in the real ComfyUI server: two subjects, each region with only its own LoRA.

The server (mini SD1.5 checkpoint, this pack in custom_nodes/) first trains two subject LoRAs with the pack's own
Dataset and Train nodes, then runs the example workflow unmodified but for small settings (a 128×64 canvas, 3 steps)
and a SaveLatent beside its VAE Decode. The same graph with both hooks set to the first LoRA, and with both set to
the second, are the references: where each region sees only its own hook, the left half of the composed latent is
the first LoRA's left half (up to batching) and far from the second's, and the other way round on the right.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", REPO.parent / "shared" / "comfyui")).resolve()
SUBJECTS = {"two_a": ("sks", "dog", (200, 40, 40)), "two_b": ("ohwx", "cat", (40, 60, 210))}
SMALL = {"12": {"width": 128, "height": 64}, "13": {"steps": 3, "sampler_name": "euler", "scheduler": "normal"},
         "1": {"ckpt_name": "mini_sd15.safetensors"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, mini_checkpoint):
    from comfy_server import ComfyServer
    from PIL import Image

    base = tmp_path_factory.mktemp("comfyui-two-subjects")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / "comfyui-dreambooth", target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    os.symlink(mini_checkpoint, base / "models" / "checkpoints" / "mini_sd15.safetensors")
    rng = np.random.default_rng(3)
    for name, (_, _, colour) in SUBJECTS.items():
        folder = base / "input" / name
        folder.mkdir(parents=True)
        for i in range(2):
            img = np.full((64, 64, 3), 90 + 60 * i, np.uint8)
            img[12:52, 12:52] = np.clip(np.array(colour) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    srv = ComfyServer(base, COMFYUI_DIR, sys.executable, env=env)
    srv.start()
    srv.base = base
    try:
        yield srv
    finally:
        srv.stop()


def _run(server, graph) -> dict:
    entry = server.wait(server.queue(graph), timeout=300)
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert entry["status"]["status_str"] == "success", json.dumps(errors)[:3000]
    return entry


@pytest.fixture(scope="module")
def loras(server):
    """Two subjects trained by the pack's own nodes in this server (Dataset → Train, no class images)."""
    example = json.loads((HERE / "dreambooth_api.json").read_text())
    graph = {"1": copy.deepcopy(example["1"])}
    graph["1"]["inputs"]["ckpt_name"] = "mini_sd15.safetensors"
    for k, (name, (token, noun, _)) in enumerate(SUBJECTS.items()):
        dataset, train = copy.deepcopy(example["2"]), copy.deepcopy(example["6"])
        dataset["inputs"].update(folder=name, token=token, class_noun=noun, resolution=64)
        train["inputs"].pop("class_images")
        train["inputs"].update(dataset=[f"d{k}", 0], rank=4, steps=2, learning_rate=5e-2, save_name=name,
                               train_text_encoder=True)
        graph[f"d{k}"], graph[f"t{k}"] = dataset, train
        graph[f"p{k}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"t{k}", 3]}}  # its loss curve
    _run(server, graph)
    files = {name: server.base / "models" / "loras" / f"{name}.safetensors" for name in SUBJECTS}
    assert all(path.is_file() for path in files.values()), list((server.base / "models" / "loras").iterdir())
    return [f"{name}.safetensors" for name in SUBJECTS]


@pytest.fixture(scope="module")
def workflow(server):
    """The example workflow in API format: stock nodes only, hooks on CLIP and on the two area prompts."""
    from comfy_server import ui_to_api

    ui = json.loads((REPO / "example_workflows" / "two_subjects.json").read_text())
    graph = ui_to_api(ui, server.get("/object_info", timeout=60))
    kinds = {node["class_type"] for node in graph.values()}
    assert {"CreateHookLora", "SetClipHooks", "ConditioningSetAreaPercentage", "KSampler"} <= kinds
    assert graph["4"]["inputs"]["hooks"] == ["2", 0] and graph["6"]["inputs"]["clip"] == ["4", 0]
    assert graph["13"]["inputs"]["model"] == ["1", 0], "the MODEL must carry no LoRA of its own"
    return graph


def _stacked(graph, first: str, second: str) -> dict:
    """The same prompts and areas with both LoRAs loaded the plain way (stock Load LoRA, twice) and no hooks."""
    g = copy.deepcopy(graph)
    g["80"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": first,
                                                      "strength_model": 1.0, "strength_clip": 1.0}}
    g["81"] = {"class_type": "LoraLoader", "inputs": {"model": ["80", 0], "clip": ["80", 1], "lora_name": second,
                                                      "strength_model": 1.0, "strength_clip": 1.0}}
    g["13"]["inputs"]["model"] = ["81", 0]
    for encode in ("6", "7"):
        g[encode]["inputs"]["clip"] = ["81", 1]
    for hooks in ("2", "3", "4", "5"):
        del g[hooks]
    return g


def _latent(server, graph, first: str, second: str, prefix: str) -> np.ndarray:
    from safetensors.numpy import load_file

    g = copy.deepcopy(graph)
    for node_id, values in SMALL.items():
        g[node_id]["inputs"].update(values)
    if "2" in g:  # hooks (the stacked graph names its LoRAs on its loaders)
        g["2"]["inputs"]["lora_name"], g["3"]["inputs"]["lora_name"] = first, second
    g["15"]["inputs"]["filename_prefix"] = f"two/{prefix}"
    g["90"] = {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": f"two/{prefix}"}}
    entry = _run(server, g)
    image = entry["outputs"]["15"]["images"][0]
    assert image["filename"].startswith(prefix)
    (path,) = (server.base / "output" / "two").glob(f"{prefix}_*.latent")
    return load_file(str(path))["latent_tensor"][0]


def test_each_half_is_made_by_its_own_subject_only(server, loras, workflow):
    a, b = loras
    composed = _latent(server, workflow, a, b, "composed")
    only_a = _latent(server, workflow, a, a, "only_a")
    only_b = _latent(server, workflow, b, b, "only_b")
    stacked = _latent(server, _stacked(workflow, a, b), a, b, "stacked")
    assert composed.shape[-2:] == (8, 16)
    halves = (slice(None, 8), slice(8, None))

    def dist(x, y, half):
        return float(np.abs(x[..., half] - y[..., half]).mean())

    for half, own, other in ((halves[0], only_a, only_b), (halves[1], only_b, only_a)):
        apart = dist(composed, other, half)
        assert apart > 1e-3, "the two subjects' LoRAs make no difference: nothing is measured"
        assert dist(composed, own, half) < 0.05 * apart, \
            f"a region saw the other subject: {dist(composed, own, half):.4g} from its own, {apart:.4g} from the other"
        # The criterion tells scoped hooks from plain stacking, where each region sees both subjects.
        assert dist(stacked, own, half) > 0.2 * dist(own, other, half), "stacking passed for regional composition"
