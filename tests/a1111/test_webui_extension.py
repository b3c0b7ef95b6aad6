"""The extension inside the real WebUI, over its HTTP API (one server for the module, tests in order).

What a WebUI user relies on: the extension loads; a job trains on the loaded checkpoint with class
images made by the WebUI's own txt2img and cached (a second job reuses them); progress advances;
the LoRA lands in models/Lora and `<lora:NAME:1>` changes a txt2img image with every key matched.
Bad input, a second job and Cancel: test_webui_robustness.py (webui_api.py, shared with Forge).
"""
from __future__ import annotations

import re

import numpy as np
from webui_server import finished_lora, job_body, txt2img

TRAIN = "/dreambooth/v1/train"
STATUS = "/dreambooth/v1/status"
CANCEL = "/dreambooth/v1/cancel"
UNMATCHED = "didn't match keys"


def _job(subject_dir, **overrides) -> dict:
    return job_body(subject_dir, "dbtest", **overrides)


def test_extension_loads(webui):
    paths = webui.get("/openapi.json").json()["paths"]
    for route in (TRAIN, STATUS, CANCEL, "/dreambooth/v1/token"):
        assert route in paths, f"{route} not registered"
    log = webui.log()
    assert "Error loading script" not in log, log[-4000:]
    assert "dreambooth_tab.py" not in log, "the WebUI reported a problem with the extension's script"
    r = webui.get(STATUS)
    assert r.status_code == 404 and "no DreamBooth job" in r.json()["detail"]


def test_train_lora_with_prior_preservation(webui, subject_dir):
    from safetensors.torch import load_file

    r = webui.post(TRAIN, _job(subject_dir, train_text_encoder=True))
    assert r.status_code == 200, r.text
    status, keys, meta = finished_lora(webui, r.json()["id"], "dbtest", timeout=300)
    lora = webui.root / "models" / "Lora" / "dbtest.safetensors"
    # Every adapter trained (lora_up starts at zero): gradients reached the text encoder through the
    # WebUI's conditioning and the UNet through its denoiser.
    tensors = load_file(str(lora))
    untrained = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().max() > 0]
    assert not untrained, f"{len(untrained)} adapters did not train, e.g. {untrained[:3]}"
    # The class images are PNGs the WebUI's txt2img made, in the core's cache with its manifest.
    folder = webui.root / "outputs" / "dreambooth_class_images"
    assert len(list(folder.glob("*/0000[01].png"))) == 2 and list(folder.glob("*/manifest.json"))
    # The WebUI's Lora support reads the file (its NetworkOnDisk, behind /sdapi/v1/loras) as an SD1 LoRA
    # with the trigger phrase: its cards file LoRAs by ss_base_model_version / ss_v2.
    assert webui.post("/sdapi/v1/refresh-loras", {}).status_code == 200
    listed = {item["name"]: item for item in webui.get("/sdapi/v1/loras").json()}
    read = listed["dbtest"]["metadata"]
    assert (read["ss_base_model_version"], read["ss_v2"]) == ("sd_v1", "False")
    assert read["modelspec.trigger_phrase"] == "sks ball" and read["ss_output_name"] == "dbtest"


def test_the_webui_card_reads_the_subject_its_base_and_its_picture(webui, tmp_path):
    """The LoRA the job wrote, read by the WebUI's extra-networks page in-process (read_card.py): filed as
    SD1, the trigger words from ss_tag_frequency, the embedded picture served by its cover-image route; and
    the same keys through safetensors: the subject, its base (the UNet's fingerprint), a sample of it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors import safe_open

    lora = webui.root / "models" / "Lora" / "dbtest.safetensors"
    (tmp_path / "data").mkdir()
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("read_card.py")), str(webui.root),
                          str(tmp_path / "data"), str(lora.parent), "dbtest"], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    lines = [line for line in out.stdout.splitlines() if line.startswith("CARD ")]
    assert lines, out.stdout[-2000:] + out.stderr[-4000:]
    card = json.loads(lines[-1][5:])
    assert card["alias"] == "dbtest" and card["sd_version"] == "SD1"
    assert card["tags"] == [["sks ball", 3]], "the card's trigger words"
    assert card["preview"].endswith("cover-images?page=lora&item=dbtest")
    assert card["cover"]["media_type"] == "image/jpeg" and card["cover"]["bytes"] > 300
    read = card["metadata"]
    assert read["ss_tag_frequency"] == {"1_sks ball": {"sks ball": 3}} and read["ss_resolution"] == "(64, 64)"
    with safe_open(str(lora), framework="pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in read if isinstance(read[k], str)} == {k: v for k, v in read.items() if isinstance(v, str)}
    assert meta["modelspec.trigger_phrase"] == "sks ball" and meta["dreambooth_instance_prompt"] == "a photo of sks ball"
    assert meta["dreambooth_base_family"] == "sd1" and len(meta["dreambooth_base_fingerprint"]) == 16
    assert (meta["dreambooth_resolution"], meta["ss_steps"], meta["dreambooth_rank"]) == ("64", "2", "4")
    assert meta["dreambooth_thumbnail_source"] == "sample", "the WebUI samples: the picture shows the trained subject"
    assert meta["modelspec.thumbnail"].startswith("data:image/jpeg;base64,")


def test_second_job_reuses_the_cached_class_images(webui, subject_dir):
    job = webui.post(TRAIN, _job(subject_dir, steps=1, save_name="dbtest_again")).json()
    status = webui.wait_job(job["id"])
    assert status["state"] == "completed", status
    assert status["class_images"]["generated"] == 0 and status["class_images"]["reused"] == 2


def test_lora_prompt_changes_the_image_with_every_key_matched(webui):
    from safetensors.torch import load_file, save_file

    base = txt2img(webui, "a photo of sks ball")
    assert np.array_equal(base, txt2img(webui, "a photo of sks ball")), "txt2img is not reproducible"
    with_lora = txt2img(webui, "<lora:dbtest:1> a photo of sks ball")
    assert np.abs(with_lora - base).mean() > 0.5, "the trained LoRA does not change the image"
    assert UNMATCHED not in webui.log(), re.findall(r".*didn't match keys.*", webui.log())[:1]
    # Control: the same LoRA with one key of no layer is reported at this log level.
    lora_dir = webui.root / "models" / "Lora"
    tensors = load_file(str(lora_dir / "dbtest.safetensors"))
    down = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors["lora_unet_no_such_block.lora_down.weight"] = tensors[down].clone()
    save_file(tensors, str(lora_dir / "control.safetensors"))
    txt2img(webui, "<lora:control:1> a photo of sks ball")
    assert "control.safetensors didn't match keys" in webui.log()


def test_full_fine_tune_saves_a_checkpoint_and_restores_the_loaded_model(webui, subject_dir, mini_checkpoint):
    from safetensors import safe_open

    before = txt2img(webui, "a photo of sks ball", seed=3)
    job = webui.post(TRAIN, _job(subject_dir, mode="full", steps=1, prior=False, learning_rate=1e-3,
                                 save_name="dbfull")).json()
    status = webui.wait_job(job["id"])
    assert status["state"] == "completed", status
    saved = webui.root / "models" / "Stable-diffusion" / "dbfull.safetensors"
    assert status["full_paths"] == [str(saved)] and saved.with_suffix(".yaml").is_file()
    with safe_open(str(saved), framework="pt") as new, safe_open(str(mini_checkpoint), framework="pt") as old:
        assert set(new.keys()) == set(old.keys()), "the saved checkpoint's keys differ from the loaded one's"
        key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
        assert not new.get_tensor(key).equal(old.get_tensor(key)), "full fine-tuning changed no UNet weight"
        meta = new.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.trigger_phrase"] == "sks ball"
    assert meta["dreambooth_kind"] == "checkpoint" and meta["modelspec.thumbnail"].startswith("data:image/jpeg")
    # The WebUI's loaded model is back to the checkpoint's weights.
    assert np.array_equal(before, txt2img(webui, "a photo of sks ball", seed=3))


def test_install_py_leaves_the_webui_packages_alone():
    """The WebUI runs install.py at start: nothing to install here, and torch & co. keep their pins."""
    import subprocess
    import sys
    from importlib.metadata import version
    from pathlib import Path

    pins = ("torch", "torchvision", "Pillow", "accelerate", "transformers", "safetensors", "numpy")
    before = {p: version(p) for p in pins}
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(repo / "install.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "all requirements present" in out.stdout, out.stdout + out.stderr
    assert {p: version(p) for p in pins} == before


def test_the_test_checkpoint_gives_the_default_emphasis_a_mean_far_from_zero(mini_checkpoint):
    """The WebUI's default emphasis divides by the mean of the text encoder's output; with the random
    CLIP's zero layer-norm biases that mean was ~1e-9 and the quotient NaN or 1 depending on the CPU
    (issue 41). The fixture must keep it well away from zero on any CPU."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from webui_server import CLIP_CONFIG

    prefix = "cond_stage_model.transformer."
    sd = {k[len(prefix):]: v.float() for k, v in load_file(str(mini_checkpoint)).items() if k.startswith(prefix)}
    clip = CLIPTextModel(CLIPTextConfig(**json.loads(CLIP_CONFIG.read_text())))
    clip.load_state_dict(sd, strict=False)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2444, 49407] + [49407] * 70])  # "a photo of a ball"
    with torch.no_grad():
        z = clip(input_ids=ids).last_hidden_state
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) > 1e-2, f"text encoder output mean {z.mean().item():.3g} is near zero"
