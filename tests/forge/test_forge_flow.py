"""Flux dev, Flux schnell, Chroma and SD3.5 (large, medium) train on Forge's own engines, loaded by Forge's
loader from tiny checkpoints in the real single-file layout (flow_checkpoint.py; its reduced configs and
huggingface_guess wrapper are test scaffolding).

In one process (flow_engine.py, in a writable copy of Forge), for each family: Forge detects it and loads
every key; training uses Forge's own σ grid (the predictor's shift), noising and velocity (x − σ·v is
`KModel.apply_model`'s x0), Flux dev's distilled guidance, SD3.5's CLIP-L + CLIP-G (+ T5 slots) context and
pooled vector; a LoRA trains with prior preservation; Forge's
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
#: SD3.5's joint blocks: attention and MLP of both streams; the last block's context stream only computes its
#: q/k/v (pre_only); SD3.5 medium's x blocks have a second attention (attn2)
FULL_JOINT = {f"{s}_block_{k}" for s in ("context", "x") for k in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")}
LAST_JOINT = {"context_block_attn_qkv"} | {f"x_block_{k}" for k in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")}
SD35_KEYS = {
    "sd35-large": {f"lora_unet_joint_blocks_0_{k}" for k in FULL_JOINT} |
                  {f"lora_unet_joint_blocks_1_{k}" for k in LAST_JOINT},
    "sd35-medium": {f"lora_unet_joint_blocks_0_{k}" for k in LAST_JOINT | {"x_block_attn2_qkv", "x_block_attn2_proj"}},
}
LN_E = 2.718281828459045


@pytest.mark.parametrize("family, engine, detected, predictor, shift, guidance, architecture", [
    ("flux", "Flux", "Flux", "PredictionFlux", LN_E ** 1.15, 3.5, "flux-1-dev/lora"),
    ("flux-schnell", "Flux", "FluxSchnell", "PredictionFlux", LN_E, None, "flux-1-schnell/lora"),
    ("chroma", "Chroma", "FluxSchnell", "PredictionFlux", LN_E, None, "chroma/lora"),  # Forge makes that Chroma
    ("sd35-large", "StableDiffusion3", "SD3", "PredictionDiscreteFlow", 3.0, None, "stable-diffusion-3-medium/lora"),
    ("sd35-medium", "StableDiffusion3", "SD3", "PredictionDiscreteFlow", 3.0, None, "stable-diffusion-3-medium/lora"),
])
def test_flow_lora_with_prior_preservation_on_forges_engine(flow, family, engine, detected, predictor, shift, guidance,
                                                            architecture):
    r = flow[family]
    sd3 = family.startswith("sd35")
    trained = "sd3" if sd3 else family  # the LoRA's family
    keys = SD35_KEYS[family] if sd3 else BLOCK_KEYS
    assert (r["detected"], r["engine"], r["family"]) == (detected, engine, trained)
    assert r["load_log_problems"] == [], "Forge's loader left keys of the tiny checkpoint unused"
    assert "'ignore': 0}" in r["state_dict_keys"], r["state_dict_keys"]
    # The schedule is Forge's own: its predictor's shift (Flux: e^μ), σ grid, noising and velocity.
    assert r["schedule"] == "FlowSchedule" and r["predictor"] == predictor
    assert r["shift"] == pytest.approx(shift, rel=1e-5) and r["host_shift"] == pytest.approx(shift, rel=1e-5)
    assert r["sigmas_match"] and r["noising_match"] and r["velocity_match"]
    assert r["batch_match"], "a batch of captions of different lengths predicts otherwise than each alone"
    assert r["guidance"] == guidance  # Flux dev: Forge's default Distilled CFG, as kohya trains
    assert "vector" in r["cond_keys"] if family != "chroma" else r["cond_keys"] == ["context", "context_len"]
    if family == "chroma":
        assert r["text_len"] != r["class_text_len"], "Chroma's prompts keep their own T5 lengths"
    if sd3:  # CLIP-L + CLIP-G (one 77-token chunk), then T5's 256 slots (zeros: Forge's Enable T5 is off)
        assert r["text_len"] == r["class_text_len"] == 77 + 256 and r["vector_width"] == 32 + 32
        assert r["tokenizers"] == ["CLIPTokenizer", "CLIPTokenizer"]  # the identifier is checked in CLIP-L and -G
    assert r["native_resolution"] == 1024
    assert r["steps"] == [1, 2] and all(p is not None for p in r["prior"]) and r["losses_finite"]
    assert r["checkpointing_grad_match"], "gradient checkpointing of the blocks changes the LoRA's gradient"
    assert set(r["keys"]) == keys and r["n_untrained"] == 0
    # Forge's LoRA support maps every key of the file and applies all of them
    assert r["unmatched"] == [] and r["unet_patches"] == r["modules"] == len(keys)
    assert f"with {len(keys)} keys at weight 1.0 (skipped 0 keys)" in r["lora_log"], r["lora_log"]
    assert "unmatched" not in r["lora_log"] and "mismatch" not in r["lora_log"].lower()
    assert r["lora_change"] > 1e-3, "applying the LoRA with Forge's LoRA support does not change the prediction"
    assert r["unloaded_equal"] and r["restored"], "the engine predicts differently after training / unloading"
    assert r["metadata"] == {"ss_base_model_version": {"flux": "flux1", "flux-schnell": "flux1"}.get(trained, trained),
                             "modelspec.architecture": architecture, "dreambooth_base_family": trained}
    if family == "flux":
        assert r["sd_version"] == "Flux"  # the Lora tab files it under Flux
    assert "train_text_encoder" in r["refused"]["train_text_encoder"] and "mode" in r["refused"]["mode"]
    # class images: Forge's Flux preset (CFG 1 beside the distilled guidance), Stability's SD3.5 sampling (CFG 4.5,
    # DPM++ 2M on the model's own σ grid), unless the request says otherwise
    expected = [4.5, "DPM++ 2M:Simple"] if sd3 else [7.0 if family == "chroma" else 1.0, "Euler:Simple"]
    assert r["class_sampling"]["open"] == expected
    assert r["class_sampling"]["given"] == [6.0, "DPM++ 2M"]


#: the families the API test runs on the session's server: (LoRA family, model-spec architecture, the class-image
#: sampling a request that leaves it open gets, the token check's pieces: one CLIP-L, or CLIP-L and CLIP-G)
API_FAMILIES = {
    "flux": ("flux", "flux-1-dev/lora", (1.0, "Euler:Simple"), [["sks</w>"]]),
    "sd35-large": ("sd3", "stable-diffusion-3-medium/lora", (4.5, "DPM++ 2M:Simple"), [["sks</w>"], ["sks</w>"]]),
}


def flow_txt2img(webui, prompt: str, sampling=(1.0, "Euler:Simple"), seed: int = 3):
    """One 64 px, 2-step image with a family's class-image sampling (CFG, sampler:schedule); Forge's "Automatic"
    schedule gives NaN images on the tiny Flux (a blank PNG)."""
    import base64
    import io

    from PIL import Image

    cfg, sampler = sampling
    name, _, scheduler = sampler.partition(":")
    r = webui.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": seed,
                                          "sampler_name": name, "scheduler": scheduler, "cfg_scale": cfg})
    assert r.status_code == 200, r.text[:2000]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), dtype=float)
    assert image.std() > 0, "txt2img gave a blank image"
    return image


@pytest.mark.parametrize("family", list(API_FAMILIES))
def test_a_flow_job_through_the_api_and_forges_lora_support(forge, subject_dir, checkpoints, family):
    """Flux dev / SD3.5 picked in Forge's checkpoint menu: the API's job trains a LoRA with prior preservation
    (class images by Forge's txt2img with the family's sampling: Forge's Flux preset, Stability's SD3.5 one),
    `<lora:…:1>` applies every key of it and changes the image, and the loaded model is as before."""
    from PIL import Image
    from safetensors import safe_open

    trained, architecture, sampling, pieces = API_FAMILIES[family]
    name = f"db{family.replace('-', '')}"
    keys = SD35_KEYS[family] if trained == "sd3" else BLOCK_KEYS
    assert forge.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoints[family].stem}).status_code == 200
    try:
        start = len(forge.log())
        base = flow_txt2img(forge, "a photo of sks ball", sampling)
        assert "Loading Model" in forge.log()[start:] and "StateDict Keys" in forge.log()[start:]
        token = forge.post("/dreambooth/v1/token", {"token": "sks"}).json()  # checked in the CLIP tokenizer(s)
        assert token["single"] is True and token["pieces"] == pieces, token
        r = forge.post("/dreambooth/v1/train", job_body(subject_dir, name))
        assert r.status_code == 200, r.text
        status = forge.wait_job(r.json()["id"], timeout=600)
        assert status["state"] == "completed", (status, forge.log()[-3000:])
        assert status["class_images"]["generated"] == 2
        made = sorted(Path(status["class_images"]["folder"]).rglob("*.png"))
        assert len(made) == 2 and all(np.asarray(Image.open(p), dtype=float).std() > 0 for p in made), made
        assert [h["step"] for h in status["history"]] == [1, 2]
        assert all(h["prior_loss"] is not None and np.isfinite(h["loss"]) for h in status["history"])
        lora = forge.root / "models" / "Lora" / f"{name}.safetensors"
        assert status["lora_path"] == str(lora)
        with safe_open(str(lora), framework="pt") as f:
            file_keys, meta = {k.split(".")[0] for k in f.keys()}, f.metadata()
        assert file_keys == keys
        assert meta["dreambooth_base_family"] == trained and meta["modelspec.architecture"] == architecture
        run = json.loads((forge.root / "outputs" / "dreambooth" / name / "config.json").read_text())["config"]
        assert (run["class_guidance"], run["class_sampler"]) == sampling, "not the family's class-image sampling"
        assert np.array_equal(base, flow_txt2img(forge, "a photo of sks ball", sampling)), \
            "training changed the loaded model"
        mark = len(forge.log())
        with_lora = flow_txt2img(forge, f"<lora:{name}:1> a photo of sks ball", sampling)
        log = forge.log()[mark:]
        assert f"for KModel-UNet with {len(keys)} keys at weight 1.0 (skipped 0 keys)" in log, log[-2000:]
        assert "unmatched" not in log and "ismatch" not in log, log[-2000:]
        assert np.abs(with_lora - base).mean() > 0.5, "the trained LoRA does not change the image"
        assert " Missing: [" not in forge.log()[start:] and " Unexpected: [" not in forge.log()[start:]
    finally:
        assert forge.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoints["sd15"].stem}).status_code == 200
    txt2img(forge, "a photo of sks ball")
