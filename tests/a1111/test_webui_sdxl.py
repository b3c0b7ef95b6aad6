"""SDXL in the real Automatic1111 WebUI 1.10, over its HTTP API (the session's server, tests in order).

The mini SDXL (a1111_checkpoint.py: generative-models' sd_xl_base.yaml with reduced sizes, the `.yaml`
beside the file, OpenCLIP-G as open_clip's smallest text tower) is loaded into the session's server, as a
user picks it in the checkpoint menu. A LoRA job with prior preservation, both text encoders and gradient
checkpointing trains on the WebUI's own SDXL model (its conditioner's context and ADM vector); the file has
the kohya SDXL names (`lora_te1_`, `lora_te2_`, `lora_unet_`) and SDXL metadata; the WebUI's Lora support
matches every key, applies it without an error and changes the image; the loaded model is as before once
the job ends.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from webui_server import checkpoint_loaded, finished_lora, job_body, txt2img

TRAIN = "/dreambooth/v1/train"


@pytest.fixture(scope="module")
def sdxl(webui, sdxl_checkpoint, mini_checkpoint):
    """The session's WebUI with the mini SDXL loaded for this module (the mini SD1.5 again after)."""
    with checkpoint_loaded(webui, sdxl_checkpoint.stem, then=mini_checkpoint.stem) as server:
        yield server


def test_the_webui_builds_the_reduced_sdxl_from_the_yaml_beside_it(sdxl, sdxl_checkpoint):
    r = sdxl.post("/dreambooth/v1/token", {"token": "sks"})
    assert r.status_code == 200 and r.json()["single"] is True, r.text  # both SDXL tokenizers keep it whole
    assert f"Creating model from config: {sdxl.root}/models/Stable-diffusion/{sdxl_checkpoint.stem}.yaml" in sdxl.log()


def test_a_full_fine_tune_of_sdxl_is_refused_before_any_work(sdxl, subject_dir):
    last = sdxl.get("/dreambooth/v1/status").json().get("id")
    r = sdxl.post(TRAIN, job_body(subject_dir, "dbxl_full", mode="full"))
    assert r.status_code == 400 and "mode 'full'" in r.json()["detail"] and "'lora'" in r.json()["detail"], r.text
    assert sdxl.get("/dreambooth/v1/status").json().get("id") == last, "a job was started"


def test_sdxl_lora_with_prior_preservation_loads_in_the_webui_with_every_key(sdxl, subject_dir):
    from safetensors.torch import load_file

    before = txt2img(sdxl, "a photo of sks ball", seed=3)
    r = sdxl.post(TRAIN, job_body(subject_dir, "dbxl", train_text_encoder=True, class_noun="cube",
                                  gradient_checkpointing="full"))  # the UNet's blocks recomputed
    assert r.status_code == 200, r.text
    status, keys, meta = finished_lora(sdxl, r.json()["id"], "dbxl", text_encoders=("lora_te1", "lora_te2"))
    assert all(np.isfinite(h["loss"]) for h in status["history"])
    assert meta["dreambooth_base_family"] == "sdxl" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert not any(k.startswith("lora_te_") for k in keys), "SDXL files name the encoders lora_te1 / lora_te2"
    modules = {k.split(".")[0] for k in keys}
    # OpenCLIP-G's fused attention carries q, k, v and out like CLIP-L's Linears (10 layers × 6 targets).
    assert len({m for m in modules if m.startswith("lora_te2_")}) == 60
    assert {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_9_mlp_fc2"} <= modules
    # Every adapter trained but CLIP-L's last layer: SDXL reads CLIP-L's penultimate layer, so that one never
    # reaches the UNet (as in kohya's SDXL files); gradients reached CLIP-G through the WebUI's conditioner.
    tensors = load_file(str(sdxl.root / "models" / "Lora" / "dbxl.safetensors"))
    untrained = sorted(k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().max() > 0)
    assert len(untrained) == 6 and all(k.startswith("lora_te1_text_model_encoder_layers_11_") for k in untrained), \
        untrained[:8]
    # The WebUI's model is as it was: adapters, the attention forwards and trainable flags are gone.
    assert np.array_equal(before, txt2img(sdxl, "a photo of sks ball", seed=3)), "training changed the loaded model"


def test_the_webuis_lora_support_applies_every_key_of_the_sdxl_lora(sdxl):
    base = txt2img(sdxl, "a photo of sks ball")
    start = len(sdxl.log())
    with_lora = txt2img(sdxl, "<lora:dbxl:1> a photo of sks ball")
    assert np.abs(with_lora - base).mean() > 0.5, "the trained LoRA does not change the SDXL image"
    log = sdxl.log()[start:]
    assert "didn't match keys" not in log, re.findall(r".*didn't match keys.*", log)[:1]
    assert "Network dbxl layer" not in log, re.findall(r".*Network dbxl layer.*", log)[:2]  # a key that failed to apply
    assert "Traceback" not in log, log[-3000:]
