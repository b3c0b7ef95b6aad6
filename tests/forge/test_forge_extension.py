"""The extension inside the real Forge WebUI, over its HTTP API (one server for the module, tests in order).

What a Forge user relies on: the extension loads; a LoRA job with prior preservation trains on the
loaded checkpoint (class images by Forge's own txt2img), through the real API, with gradients reaching
the UNet and the text encoder; the LoRA lands in models/Lora and Forge's built-in LoRA support
(extensions-builtin/sd_forge_lora) applies it with every key matched and a changed image; the loaded
model is as before once the job ends; a model Forge loads that cannot train is refused before any work.
Bad input, a second job and Cancel: test_forge_robustness.py (tests/a1111/webui_api.py, shared with A1111).
"""
from __future__ import annotations

import re

import numpy as np
from webui_server import finished_lora, job_body, txt2img

TRAIN = "/dreambooth/v1/train"
STATUS = "/dreambooth/v1/status"
TOKEN = "/dreambooth/v1/token"
# Forge's LoRA loader prints these for keys that match no layer (any log level); its checkpoint loader
# prints "<part> Missing: [...]" / "<part> Unexpected: [...]" for keys left out or unknown.
UNMATCHED = ("unmatched keys", "version mismatch", "Mismatch ")


def _job(subject_dir, **overrides) -> dict:
    return job_body(subject_dir, "dbforge", **overrides)


def test_extension_loads_and_the_placeholder_model_is_loaded_on_demand(forge):
    paths = forge.get("/openapi.json").json()["paths"]
    for route in (TRAIN, STATUS, "/dreambooth/v1/cancel", TOKEN):
        assert route in paths, f"{route} not registered"
    log = forge.log()
    assert "Error loading script" not in log, log[-4000:]
    assert "dreambooth_tab.py" not in log, "Forge reported a problem with the extension's script"
    # No generation has run: Forge's model is still its FakeInitialModel; the token check loads the
    # selected checkpoint and reads the engine's CLIP-L tokenizer.
    r = forge.post(TOKEN, {"token": "sks"})
    assert r.status_code == 200, r.text
    assert r.json()["single"] is True and r.json()["pieces"] == [["sks</w>"]]
    assert "StateDict Keys" in forge.log(), "the checkpoint was not loaded"


def test_the_test_checkpoint_loads_with_no_key_left_over(forge):
    log = forge.log()
    assert re.search(r"StateDict Keys: \{'unet': \d+, 'vae': 248, 'text_encoder': 196, 'ignore': 0\}", log), \
        re.findall(r".*StateDict Keys.*", log)
    assert " Missing: [" not in log and " Unexpected: [" not in log, re.findall(r".*(?:Missing|Unexpected): .*", log)[:2]


def test_train_lora_with_prior_preservation(forge, subject_dir):
    from safetensors.torch import load_file

    before = txt2img(forge, "a photo of sks ball", seed=3)
    r = forge.post(TRAIN, _job(subject_dir, train_text_encoder=True))
    assert r.status_code == 200, r.text
    status, keys, meta = finished_lora(forge, r.json()["id"], "dbforge")
    assert all(np.isfinite(h["loss"]) for h in status["history"])
    lora = forge.root / "models" / "Lora" / "dbforge.safetensors"
    assert meta["dreambooth_base_family"] == "sd1" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["dreambooth_thumbnail_source"] == "sample", "Forge samples: the picture shows the trained subject"
    # Every adapter trained (lora_up starts at zero): gradients reached the UNet through Forge's own
    # UNet forward and the text encoder through the engine's own conditioning code.
    tensors = load_file(str(lora))
    untrained = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().max() > 0]
    assert not untrained, f"{len(untrained)} adapters did not train, e.g. {untrained[:3]}"
    folder = forge.root / "outputs" / "dreambooth_class_images"
    assert len(list(folder.glob("*/0000[01].png"))) == 2 and list(folder.glob("*/manifest.json"))
    # The shared model is as it was: adapters, patched forwards and swapped tensors are gone.
    assert np.array_equal(before, txt2img(forge, "a photo of sks ball", seed=3)), "training changed the loaded model"


def test_forge_lora_support_applies_every_key_and_changes_the_image(forge):
    from safetensors.torch import load_file, save_file

    base = txt2img(forge, "a photo of sks ball")
    assert np.array_equal(base, txt2img(forge, "a photo of sks ball")), "txt2img is not reproducible"
    start = len(forge.log())
    with_lora = txt2img(forge, "<lora:dbforge:1> a photo of sks ball")
    assert np.abs(with_lora - base).mean() > 0.5, "the trained LoRA does not change the image"
    log = forge.log()[start:]
    assert not any(word in log for word in UNMATCHED), re.findall(r".*\[LORA\].*", log)
    tensors = load_file(str(forge.root / "models" / "Lora" / "dbforge.safetensors"))
    n_unet = len({k.split(".")[0] for k in tensors if k.startswith("lora_unet_")})
    n_te = len({k.split(".")[0] for k in tensors if k.startswith("lora_te")})
    assert re.search(rf"\[LORA\] Loaded \S*dbforge\.safetensors for \w+-UNet with {n_unet} keys .*\(skipped 0 keys\)", log), \
        re.findall(r".*\[LORA\].*", log)
    assert re.search(rf"\[LORA\] Loaded \S*dbforge\.safetensors for \w+-CLIP with {n_te} keys .*\(skipped 0 keys\)", log), \
        re.findall(r".*\[LORA\].*", log)
    # Control: the same LoRA with one key of no layer is reported by Forge's loader.
    down = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors["lora_unet_no_such_block.lora_down.weight"] = tensors[down].clone()
    save_file(tensors, str(forge.root / "models" / "Lora" / "dbcontrol.safetensors"))
    txt2img(forge, "<lora:dbcontrol:1> a photo of sks ball")
    assert re.search(r"dbcontrol\.safetensors.* with unmatched keys \['lora_unet_no_such_block", forge.log())


def test_a_job_after_a_lora_prompt_trains_the_checkpoint_itself(forge, subject_dir):
    """The LoRA of the last prompt is merged into the weights by Forge's loader; the job takes it off first
    (the UNet's fingerprint in the new file is the checkpoint's), and the base image is unchanged after."""
    from safetensors import safe_open

    base = txt2img(forge, "a photo of sks ball", seed=5)
    txt2img(forge, "<lora:dbforge:1> a photo of sks ball", seed=5)  # merged into the weights now
    job = forge.post(TRAIN, _job(subject_dir, steps=1, save_name="dbforge_again")).json()
    status = forge.wait_job(job["id"], timeout=600)
    assert status["state"] == "completed", status
    assert status["class_images"]["generated"] == 0 and status["class_images"]["reused"] == 2
    lora_dir = forge.root / "models" / "Lora"
    with safe_open(str(lora_dir / "dbforge.safetensors"), framework="pt") as a, \
            safe_open(str(lora_dir / "dbforge_again.safetensors"), framework="pt") as b:
        assert a.metadata()["dreambooth_base_fingerprint"] == b.metadata()["dreambooth_base_fingerprint"]
    assert np.array_equal(base, txt2img(forge, "a photo of sks ball", seed=5))


def test_a_model_forge_loads_that_cannot_train_is_refused_before_any_work(forge, subject_dir, checkpoints):
    """The inpainting variant (Forge's StableDiffusion engine with a 9-channel UNet) is named and refused;
    no job starts and no class image is made. Full fine-tuning is refused on any Forge model."""
    r = forge.post(TRAIN, _job(subject_dir, mode="full", save_name="dbfull"))
    assert r.status_code == 400 and "mode 'lora'" in r.json()["detail"], r.text
    last = forge.get(STATUS).json()["id"]
    folder = forge.root / "outputs" / "dreambooth_class_images"
    made = sorted(folder.rglob("*.png"))
    assert forge.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoints["inpaint"].stem}).status_code == 200
    try:
        r = forge.post(TRAIN, _job(subject_dir, save_name="dbinpaint", class_noun="cube"))
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert "inpainting StableDiffusion model" in detail and "SDXL" in detail, detail
        assert forge.get(STATUS).json()["id"] == last, "a job was started"
        assert sorted(folder.rglob("*.png")) == made, "class images were made"
        assert not (forge.root / "models" / "Lora" / "dbinpaint.safetensors").exists()
    finally:
        assert forge.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoints["sd15"].stem}).status_code == 200
    txt2img(forge, "a photo of sks ball")


def test_the_tab_is_in_forges_ui(tmp_path_factory, checkpoints):
    """With its Gradio 4 UI on, Forge lists the DreamBooth tab and reports no error from the extension."""
    from forge_server import start_forge, stop_webui

    server = start_forge(tmp_path_factory.mktemp("forge_ui"), [checkpoints["sd15"]], checkpoints["sd15"], ui=True)
    try:
        config = server.get("/config").json()
        labels = {c.get("props", {}).get("label") for c in config["components"]}
        assert "DreamBooth" in labels, sorted(str(x) for x in labels)[:40]
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"dreambooth_train", "dreambooth_token"} <= ids
        log = server.log()
        assert "Error loading script" not in log and "Traceback" not in log, log[-4000:]
    finally:
        stop_webui(server)
