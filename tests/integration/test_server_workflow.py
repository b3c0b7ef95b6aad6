"""The pack inside a real ComfyUI server, driven over its HTTP API like a user's browser.

One server for the module: `main.py --cpu` from the read-only source, on a free loopback port,
with a temporary base directory whose custom_nodes/ links to this repository and whose
models/checkpoints holds the seeded mini SD1.5 checkpoint. The example workflow
(example_workflows/dreambooth.json, the front end's format) is converted to the API format and
queued with small settings (64 px, a few steps) so the whole module runs in a few minutes on CPU.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", REPO.parent / "shared" / "comfyui")).resolve()
PROMPT = "a photo of sks dog in the snow"
LORA = "it_lora"

# Small, fast settings for the example workflow (node id -> input overrides).
OVERRIDES = {
    "1": {"ckpt_name": "mini_sd15.safetensors"},
    "2": {"folder": "dog", "resolution": 64},
    "4": {"count": 2, "steps": 2, "sampler_name": "euler", "scheduler": "normal", "resolution": 64},
    "6": {"rank": 4, "steps": 4, "learning_rate": 5e-3, "save_name": LORA, "caption_dropout": 0.5},
    "8": {"prompt_set": "custom", "custom_prompts": "a photo of {token} {class} on the beach", "seeds": "0",
          "steps": 2, "sampler_name": "euler", "scheduler": "normal", "resolution": 64},
    "9": {"filename_prefix": "it/grid"},
    "10": {"text": PROMPT},
    "12": {"width": 64, "height": 64},
    "13": {"steps": 3, "sampler_name": "euler", "scheduler": "normal"},
    "15": {"filename_prefix": "it/trained"},
    "16": {"text": PROMPT},
    "18": {"steps": 3, "sampler_name": "euler", "scheduler": "normal"},
    "20": {"filename_prefix": "it/base_before"},
}
BASE_ONLY = ("1", "12", "16", "17", "18", "19", "20")


@pytest.fixture(scope="module")
def server(tmp_path_factory, mini_checkpoint):
    from comfy_server import ComfyServer
    from PIL import Image

    base = tmp_path_factory.mktemp("comfyui-server")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / "comfyui-dreambooth", target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    os.symlink(mini_checkpoint, base / "models" / "checkpoints" / "mini_sd15.safetensors")
    dog = base / "input" / "dog"
    dog.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        img = np.full((64, 64, 3), 40 + 60 * i, np.uint8)
        img[12:52, 12:52] = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(dog / f"photo_{i}.png")
    (base / "input" / "empty_set").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "DREAMBOOTH_ALLOW_ANY_PATH"}  # the default policy
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    srv = ComfyServer(base, COMFYUI_DIR, sys.executable, env=env)
    srv.start()
    srv.base = base
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info", timeout=60)


@pytest.fixture(scope="module")
def workflow(object_info):
    """The example workflow in API format, with the test's small settings."""
    from comfy_server import is_widget, ui_to_api

    ui = json.loads((REPO / "example_workflows" / "dreambooth.json").read_text())
    graph = ui_to_api(ui, object_info)
    committed = json.loads((HERE / "dreambooth_api.json").read_text())
    assert graph == committed, "example_workflows/dreambooth.json and tests/integration/dreambooth_api.json differ"
    for node_id, node in graph.items():  # a widget added to a node must be added to the example too
        info = object_info[node["class_type"]]
        if info.get("category") == "DreamBooth":
            widgets = {name for section in ("required", "optional")
                       for name, spec in info["input"].get(section, {}).items() if is_widget(spec)}
            assert widgets <= set(node["inputs"]), f"example node {node_id} lacks {widgets - set(node['inputs'])}"
    for node_id, values in OVERRIDES.items():
        graph[node_id]["inputs"].update(values)
    return graph


def errors(entry) -> str:
    return "\n".join(json.dumps(data) for event, data in entry["status"]["messages"] if event == "execution_error")


def run(server, graph, timeout=600.0) -> dict:
    entry = server.wait(server.queue(graph), timeout=timeout)
    assert entry["status"]["status_str"] == "success", errors(entry) or entry["status"]
    return entry


def saved_image(server, entry, node_id) -> np.ndarray:
    from PIL import Image

    info = entry["outputs"][node_id]["images"][0]
    path = server.base / ("output" if info["type"] == "output" else "temp") / info["subfolder"] / info["filename"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def subgraph(graph, ids) -> dict:
    return {i: copy.deepcopy(graph[i]) for i in ids}


def test_pack_imports_and_lists_its_nodes(server, object_info):
    log = server.log()
    assert "comfyui-dreambooth" in log
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line], log[-3000:]
    ours = {k: v for k, v in object_info.items() if v.get("category") == "DreamBooth"}
    assert set(ours) == {"DreamBoothDataset", "DreamBoothClassImages", "DreamBoothTrain", "DreamBoothSampleGrid",
                         "DreamBoothLoadSubject", "DreamBoothSubjectPrompt"}
    for name, info in ours.items():
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert "empty_set" in object_info["DreamBoothDataset"]["input"]["required"]["folder"][0]


def test_workflow_trains_and_the_base_model_stays_untouched(server, workflow):
    # 1. the base MODEL's image, before any training
    before = run(server, subgraph(workflow, BASE_ONLY))
    base_before = saved_image(server, before, "20")

    # 2. the whole example workflow
    t0 = time.monotonic()
    entry = run(server, workflow)
    print(f"\n[timing] example workflow: {time.monotonic() - t0:.1f} s")
    out = entry["outputs"]
    assert out["4"]["generated"] == [2] and out["4"]["reused"] == [0], out["4"]
    lora_path = out["6"]["lora_path"][0]
    assert Path(lora_path) == server.base / "models" / "loras" / f"{LORA}.safetensors"
    assert Path(lora_path).is_file()
    assert (server.base / "output" / "dreambooth" / LORA / "loss.png").is_file()
    run_config = json.loads((server.base / "output" / "dreambooth" / LORA / "config.json").read_text())["config"]
    assert run_config["caption_dropout"] == 0.5  # the optional widget reaches the trainer
    trained = saved_image(server, entry, "15")
    assert "images" in out["9"]  # the sample grid was saved
    assert np.abs(trained - base_before).mean() > 1.0, "the trained MODEL samples like the base"

    # 3. after training: the base MODEL again (a stock KSamplerAdvanced, so nothing is cached)
    #    and the saved LoRA through the stock LoraLoader
    graph = subgraph(workflow, ("1", "12", "16", "17"))
    sampler = {k: workflow["18"]["inputs"][k] for k in ("cfg", "sampler_name", "scheduler", "steps", "positive",
                                                         "negative", "latent_image", "model")}
    graph["40"] = {"class_type": "KSamplerAdvanced",
                   "inputs": dict(sampler, add_noise="enable", noise_seed=workflow["18"]["inputs"]["seed"],
                                  start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable")}
    graph["41"] = {"class_type": "VAEDecode", "inputs": {"samples": ["40", 0], "vae": ["1", 2]}}
    graph["42"] = {"class_type": "SaveImage", "inputs": {"images": ["41", 0], "filename_prefix": "it/base_after"}}
    graph["30"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": f"{LORA}.safetensors", "strength_model": 1.0,
                                                          "strength_clip": 1.0}}
    graph["31"] = {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["30", 1]}}
    graph["32"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["30", 1]}}
    graph["33"] = {"class_type": "KSampler", "inputs": dict(workflow["18"]["inputs"], model=["30", 0],
                                                           positive=["31", 0], negative=["32", 0])}
    graph["34"] = {"class_type": "VAEDecode", "inputs": {"samples": ["33", 0], "vae": ["1", 2]}}
    graph["35"] = {"class_type": "SaveImage", "inputs": {"images": ["34", 0], "filename_prefix": "it/lora"}}
    after = run(server, graph)
    base_after = saved_image(server, after, "42")
    via_loader = saved_image(server, after, "35")
    assert np.array_equal(base_before, base_after), "training changed the base MODEL that other nodes share"
    log = server.log()
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    # the LoRA file (fp16) reproduces the trained MODEL (fp32 adapters) closely
    assert np.abs(via_loader - trained).mean() < 0.25 * np.abs(trained - base_before).mean()


def test_the_trained_subject_loads_by_name_with_its_phrase_as_the_stock_loader_loads_it(server, workflow):
    """Load Subject -> Subject Prompt -> CLIP Text Encode gives the image the stock LoraLoader and the typed
    prompt give; the page's listing has the subject's phrase and preview."""
    listed = {s["name"]: s for s in server.get("/dreambooth/subjects")["subjects"]}
    assert listed[f"{LORA}.safetensors"]["phrase"] == "sks dog"
    assert listed[f"{LORA}.safetensors"]["thumbnail"].startswith("data:image/jpeg;base64,")
    choices = server.get("/object_info/DreamBoothLoadSubject")["DreamBoothLoadSubject"]["input"]["required"]
    assert f"{LORA}.safetensors" in choices["subject"][0]
    sampler = workflow["18"]["inputs"]
    graph = subgraph(workflow, ("1", "12"))
    graph["60"] = {"class_type": "DreamBoothLoadSubject",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "subject": f"{LORA}.safetensors",
                              "strength_model": 1.0, "strength_clip": 1.0}}
    graph["61"] = {"class_type": "DreamBoothSubjectPrompt",
                   "inputs": {"text": "a photo of {subject} in the snow", "subject": ["60", 2]}}
    graph["30"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": f"{LORA}.safetensors", "strength_model": 1.0,
                                                          "strength_clip": 1.0}}
    for first, (loader, text) in {"62": ("60", ["61", 0]), "72": ("30", PROMPT)}.items():
        i = int(first)
        graph[str(i)] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": [loader, 1]}}
        graph[str(i + 1)] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [loader, 1]}}
        graph[str(i + 2)] = {"class_type": "KSampler", "inputs": dict(sampler, model=[loader, 0], positive=[str(i), 0],
                                                                      negative=[str(i + 1), 0])}
        graph[str(i + 3)] = {"class_type": "VAEDecode", "inputs": {"samples": [str(i + 2), 0], "vae": ["1", 2]}}
        graph[str(i + 4)] = {"class_type": "SaveImage", "inputs": {"images": [str(i + 3), 0],
                                                                   "filename_prefix": f"it/subject_{first}"}}
    entry = run(server, graph)
    assert entry["outputs"]["60"]["text"] == ["sks dog (sd1)"]
    assert np.array_equal(saved_image(server, entry, "66"), saved_image(server, entry, "76"))


def test_queueing_again_reuses_the_class_images(server, workflow):
    folder_files = sorted((server.base / "output" / "dreambooth_class_images").rglob("*.png"))
    assert len(folder_files) == 2
    stamps = {p: p.stat().st_mtime_ns for p in folder_files}
    # Drop the host's node cache (so the node really runs again) and reload the checkpoint: the
    # cache key holds the model fingerprint, which must be the same for the same file.
    server.post("/free", {"free_memory": True, "unload_models": True})
    time.sleep(2.0)
    graph = subgraph(workflow, ("1", "4"))
    graph["50"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}}
    entry = run(server, graph)
    assert entry["outputs"]["4"]["generated"] == [0] and entry["outputs"]["4"]["reused"] == [2]
    assert {p: p.stat().st_mtime_ns for p in folder_files} == stamps


def test_interrupt_stops_training_keeps_a_checkpoint_and_resume_finishes(server, workflow):
    from safetensors import safe_open

    graph = subgraph(workflow, ("1", "2", "4", "6", "7"))
    graph["6"]["inputs"].update(steps=400, save_name="interrupted")
    prompt_id = server.queue(graph)
    server.wait_for_message(lambda m: m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id
                            and m["data"].get("node") == "6" and m["data"].get("value", 0) >= 2, timeout=300)
    t0 = time.monotonic()
    server.post("/interrupt", {})
    stopped = server.wait_for_message(lambda m: m.get("type") == "execution_interrupted"
                                      and m["data"].get("prompt_id") == prompt_id, timeout=120)
    latency = stopped["_t"] - t0
    print(f"\n[timing] interrupt -> stopped: {latency:.1f} s")
    assert latency < 30
    entry = server.wait(prompt_id)
    assert any(event == "execution_interrupted" for event, _ in entry["status"]["messages"])
    assert server.alive()
    ckpt = server.base / "output" / "dreambooth" / "interrupted" / "checkpoint.safetensors"
    assert ckpt.is_file()
    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["dreambooth_checkpoint"])
    step = meta["step"]
    assert 2 <= step < 400
    assert [h["step"] for h in meta["history"]] == list(range(1, step + 1)), "the checkpoint is not of a finished step"
    assert not [p.name for p in ckpt.parent.rglob("*.partial")], "a partial file was left behind"
    done = server.wait_for_message(lambda m: m.get("type") == "dreambooth.train.done"
                                   and m["data"].get("prompt_id") == prompt_id, timeout=30)
    assert done["data"]["status"] == "interrupted"
    assert f"cancelled at step {step}, resume to continue" in done["data"]["message"], done["data"]

    graph["6"]["inputs"].update(steps=step + 2, resume=True)
    entry = run(server, graph)
    text = entry["outputs"]["6"]["text"][0]
    assert text.startswith(f"{step + 2} steps"), text
    assert (server.base / "models" / "loras" / "interrupted.safetensors").is_file()


def test_cancel_during_class_images_keeps_what_was_made_and_tops_up(server, workflow):
    graph = subgraph(workflow, ("1", "4"))
    graph["4"]["inputs"].update(class_prompt="a photo of a cat", count=60)
    graph["50"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}}
    prompt_id = server.queue(graph)
    server.wait_for_message(lambda m: m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id
                            and m["data"].get("node") == "4" and m["data"].get("value", 0) >= 6, timeout=300)
    server.post("/interrupt", {})
    server.wait_for_message(lambda m: m.get("type") == "execution_interrupted"
                            and m["data"].get("prompt_id") == prompt_id, timeout=120)
    manifests = [json.loads(p.read_text()) for p in (server.base / "output" / "dreambooth_class_images").glob("*/manifest.json")]
    cats = [m for m in manifests if m["key"]["prompt"] == "a photo of a cat"]
    assert len(cats) == 1
    made = len(cats[0]["images"])
    assert 2 <= made < 60
    graph["4"]["inputs"]["count"] = made + 1  # asking for one more generates exactly one
    entry = run(server, graph)
    assert entry["outputs"]["4"]["generated"] == [1] and entry["outputs"]["4"]["reused"] == [made]


def test_dataset_takes_the_photos_and_captions_of_the_hosts_folder_loader(server, object_info):
    """The host's own dataset loader feeds DreamBooth Dataset: on 0.33 Load Image-Text (from Folder) sends
    one IMAGE per photo (of different sizes) and one caption each, as lists; 0.3.64's Load Image Dataset
    from Folder sends one batch."""
    from PIL import Image

    folder = server.base / "input" / "captioned"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(2)
    for i, (size, caption) in enumerate([((64, 64), "{token} {class} on grass"), ((96, 64), ""),
                                         ((64, 80), "a photo of sks dog asleep")]):
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
        if caption:
            (folder / f"p{i}.txt").write_text(caption)
    dataset = {"class_type": "DreamBoothDataset",
               "inputs": {"clip": ["1", 1], "folder": "[none]", "token": "sks", "class_noun": "dog", "resolution": 64,
                          "crop": "center", "flip": False, "images": ["30", 0]}}
    if "LoadImageTextDataSetFromFolder" in object_info:
        loader = {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "captioned"}}
        dataset["inputs"]["captions"] = ["30", 1]
        expected = ["'sks dog on grass'", "'a photo of sks dog'", "'a photo of sks dog asleep'"]
    else:
        loader = {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "captioned", "resize_method": "Stretch"}}
        expected = ["'a photo of sks dog'"] * 3  # a batch of images carries no captions
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini_sd15.safetensors"}},
             "30": loader, "31": dataset, "32": {"class_type": "PreviewImage", "inputs": {"images": ["31", 1]}}}
    entry = run(server, graph)
    text = entry["outputs"]["31"]["text"][0]
    assert "3 image(s) ready" in text, text
    # the loader lists the folder in the file system's order: compare the captions as a set of lines
    assert sorted(line.rsplit(": ", 1)[-1] for line in text.splitlines() if line.startswith("[")) == \
        sorted(expected), text


@pytest.mark.parametrize("case, changes, expected", [
    ("empty folder", {"2": {"folder": "empty_set"}}, "No usable image"),
    ("token that splits", {"2": {"token": "zxqv"}}, "splits into 4 tokens"),
    ("path outside input", {"2": {"path": "/etc"}}, "outside ComfyUI's input and output folders"),
    ("path escaping with ..", {"2": {"path": "../../.."}}, "DREAMBOOTH_ALLOW_ANY_PATH"),
    ("save name with ../", {"6": {"save_name": "../evil"}}, "plain file name"),
])
def test_bad_input_is_a_clear_error_on_the_node(server, workflow, case, changes, expected):
    ids = ("1", "2", "3") if "6" not in changes else ("1", "2", "4", "6", "7")
    graph = subgraph(workflow, ids)
    for node_id, values in changes.items():
        graph[node_id]["inputs"].update(values)
    entry = server.wait(server.queue(graph), timeout=300)
    assert entry["status"]["status_str"] == "error"
    failed = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert failed and failed[0]["node_id"] == next(iter(changes)), failed
    assert expected in failed[0]["exception_message"], failed[0]["exception_message"]
    assert server.alive()
    assert not (server.base / "models" / "evil.safetensors").exists()
