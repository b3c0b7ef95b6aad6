"""Flux dev, Flux schnell and Chroma train on Forge's own engines, loaded by Forge's loader from tiny
checkpoints in the real single-file layout (flow_checkpoint.py; its reduced configs and huggingface_guess
wrapper are test scaffolding).

In one process (flow_engine.py, in a writable copy of Forge), for each family: Forge detects it and loads
every key; training uses Forge's own σ grid (the predictor's shift), noising and velocity (x − σ·v is
`KModel.apply_model`'s x0), Flux dev's distilled guidance; a LoRA trains with prior preservation; Forge's
built-in LoRA support loads the file with every key used and it changes the prediction; the engine
predicts as before after release(). Through the session's server, Flux dev as a user has it: picked in
the checkpoint menu, a job with prior preservation (class images by Forge's own txt2img on Flux), the LoRA
applied by `<lora:…>` with every key, the image changed, the model unchanged after the job.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forge_server import FORGE_DIR
from webui_server import _writable_copy, job_body, txt2img


@pytest.fixture(scope="module")
def flow(tmp_path_factory, flow_checkpoints) -> dict:
    tmp = tmp_path_factory.mktemp("forge-flow")
    root = tmp / "forge"
    _writable_copy(FORGE_DIR, root)
    (root / "repositories").symlink_to(FORGE_DIR / "repositories", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "HF_HOME"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    folder = flow_checkpoints["flux"].parent
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("flow_engine.py")), str(root), str(tmp),
                          str(folder)], cwd=str(root), env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


BLOCK_KEYS = {f"lora_unet_double_blocks_0_{s}_{k}" for s in ("img", "txt") for k in ("attn_qkv", "attn_proj", "mlp_0",
                                                                                    "mlp_2")} | \
    {f"lora_unet_single_blocks_{i}_linear{j}" for i in (0, 1) for j in (1, 2)}


@pytest.mark.parametrize("family, engine, detected, mu, guidance, architecture", [
    ("flux", "Flux", "Flux", 1.15, 3.5, "flux-1-dev/lora"),
    ("flux-schnell", "Flux", "FluxSchnell", 1.0, None, "flux-1-schnell/lora"),
    ("chroma", "Chroma", "FluxSchnell", 1.0, None, "chroma/lora"),  # Forge turns that guess into Chroma
])
def test_flow_lora_with_prior_preservation_on_forges_engine(flow, family, engine, detected, mu, guidance, architecture):
    r = flow[family]
    assert (r["detected"], r["engine"], r["family"]) == (detected, engine, family)
    assert r["load_log_problems"] == [], "Forge's loader left keys of the tiny checkpoint unused"
    # The schedule is Forge's own: its PredictionFlux's shift e^μ, its σ grid, its noising, its velocity.
    assert r["schedule"] == "FlowSchedule" and r["mu"] == pytest.approx(mu)
    assert r["shift"] == pytest.approx(2.718281828 ** mu, rel=1e-5)
    assert r["sigmas_match"] and r["noising_match"] and r["velocity_match"]
    assert r["batch_match"], "a batch of captions of different lengths predicts otherwise than each alone"
    assert r["guidance"] == guidance  # Flux dev: Forge's default Distilled CFG, as kohya trains
    assert "vector" in r["cond_keys"] if family != "chroma" else r["cond_keys"] == ["context", "context_len"]
    if family == "chroma":
        assert r["text_len"] != r["class_text_len"], "Chroma's prompts keep their own T5 lengths"
    assert r["native_resolution"] == 1024
    assert r["steps"] == [1, 2] and all(p is not None for p in r["prior"]) and r["losses_finite"]
    assert r["checkpointing_grad_match"], "gradient checkpointing of the blocks changes the LoRA's gradient"
    assert set(r["keys"]) == BLOCK_KEYS and r["n_untrained"] == 0
    # Forge's LoRA support maps every key of the file and applies all of them
    assert r["unmatched"] == [] and r["unet_patches"] == r["modules"] == len(BLOCK_KEYS)
    assert f"with {len(BLOCK_KEYS)} keys at weight 1.0 (skipped 0 keys)" in r["lora_log"], r["lora_log"]
    assert "unmatched" not in r["lora_log"] and "mismatch" not in r["lora_log"].lower()
    assert r["lora_change"] > 1e-3, "applying the LoRA with Forge's LoRA support does not change the prediction"
    assert r["unloaded_equal"] and r["restored"], "the engine predicts differently after training / unloading"
    assert r["metadata"] == {"ss_base_model_version": {"flux": "flux1", "flux-schnell": "flux1"}.get(family, family),
                             "modelspec.architecture": architecture, "dreambooth_base_family": family}
    if family == "flux":
        assert r["sd_version"] == "Flux"  # the Lora tab files it under Flux
    assert "train_text_encoder" in r["refused"]["train_text_encoder"] and "mode" in r["refused"]["mode"]
    # class images: Forge's Flux preset (CFG 1 beside the distilled guidance) unless the request says otherwise
    assert r["class_sampling"]["open"] == [1.0 if family != "chroma" else 7.0, "Euler:Simple"]
    assert r["class_sampling"]["given"] == [6.0, "DPM++ 2M"]


def flux_txt2img(webui, prompt: str, seed: int = 3):
    """One 64 px, 2-step image with Forge's Flux preset (Euler with the Simple schedule, CFG 1 beside the
    distilled guidance): Forge's "Automatic" schedule gives NaN images on this Flux (a blank PNG)."""
    import base64
    import io

    from PIL import Image

    r = webui.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": seed,
                                          "sampler_name": "Euler", "scheduler": "Simple", "cfg_scale": 1.0})
    assert r.status_code == 200, r.text[:2000]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), dtype=float)
    assert image.std() > 0, "txt2img gave a blank image"
    return image


def test_a_flux_job_through_the_api_and_forges_lora_support(forge, subject_dir, checkpoints):
    """Flux dev picked in Forge's checkpoint menu: the API's job trains a LoRA with prior preservation
    (class images by Forge's txt2img with its Flux preset), `<lora:dbflux:1>` applies every key of it and
    changes the image, and the loaded model is as before."""
    from safetensors import safe_open

    assert forge.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoints["flux"].stem}).status_code == 200
    try:
        start = len(forge.log())
        base = flux_txt2img(forge, "a photo of sks ball")
        assert "Loading Model" in forge.log()[start:] and "StateDict Keys" in forge.log()[start:]
        token = forge.post("/dreambooth/v1/token", {"token": "sks"}).json()  # checked in Flux's CLIP-L tokenizer
        assert token["single"] is True and token["pieces"] == [["sks</w>"]], token
        r = forge.post("/dreambooth/v1/train", job_body(subject_dir, "dbflux"))
        assert r.status_code == 200, r.text
        status = forge.wait_job(r.json()["id"], timeout=600)
        assert status["state"] == "completed", (status, forge.log()[-3000:])
        assert status["class_images"]["generated"] == 2
        assert [h["step"] for h in status["history"]] == [1, 2]
        assert all(h["prior_loss"] is not None and np.isfinite(h["loss"]) for h in status["history"])
        lora = forge.root / "models" / "Lora" / "dbflux.safetensors"
        assert status["lora_path"] == str(lora)
        with safe_open(str(lora), framework="pt") as f:
            keys, meta = {k.split(".")[0] for k in f.keys()}, f.metadata()
        assert keys == BLOCK_KEYS
        assert meta["dreambooth_base_family"] == "flux" and meta["modelspec.architecture"] == "flux-1-dev/lora"
        run = json.loads((forge.root / "outputs" / "dreambooth" / "dbflux" / "config.json").read_text())["config"]
        assert (run["class_guidance"], run["class_sampler"]) == (1.0, "Euler:Simple"), "not Forge's Flux preset"
        assert np.array_equal(base, flux_txt2img(forge, "a photo of sks ball")), "training changed the loaded model"
        mark = len(forge.log())
        with_lora = flux_txt2img(forge, "<lora:dbflux:1> a photo of sks ball")
        log = forge.log()[mark:]
        assert f"for KModel-UNet with {len(BLOCK_KEYS)} keys at weight 1.0 (skipped 0 keys)" in log, log[-2000:]
        assert "unmatched" not in log and "ismatch" not in log, log[-2000:]
        assert np.abs(with_lora - base).mean() > 0.5, "the trained LoRA does not change the image"
        assert " Missing: [" not in forge.log()[start:] and " Unexpected: [" not in forge.log()[start:]
    finally:
        assert forge.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoints["sd15"].stem}).status_code == 200
    txt2img(forge, "a photo of sks ball")
