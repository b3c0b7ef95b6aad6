"""Flux dev, Flux schnell, Chroma and SD3.5 (large, medium) loaded by Forge's own loader from the tiny
checkpoints of flow_checkpoint.py (its reduced configs and huggingface_guess wrapper are test scaffolding),
each trained through the extension's ForgeBackend, in one process (test code, Forge's venv; run by
test_forge_flow.py in a writable copy of Forge). Prints `RESULT {json}`.

For each engine: Forge's loader uses every key; the schedule and the prediction are Forge's own
(PredictionFlux's or PredictionDiscreteFlow's σ grid and noising, x − σ·v = `KModel.apply_model`'s x0, Flux
dev's distilled guidance, SD3.5's pooled CLIP-L + CLIP-G); captions of different text lengths batch as if
alone; a LoRA trains with prior preservation (its gradient the same with the blocks checkpointed); its file
loads in Forge's built-in LoRA support (`extensions-builtin/sd_forge_lora/networks.load_lora_for_models`)
with every key used and changes the prediction; the engine predicts as before after `release()` and after the
LoRA is taken off; text-encoder training and full fine-tuning are refused; class images default to
Forge's Flux preset (Flux, Chroma) or Stability's SD3.5 sampling.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def load_engine(path: Path):
    """forge_loader on the file, with its printed log (Missing / Unexpected keys would be there)."""
    from backend.loader import forge_loader

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        engine = forge_loader(str(path))
    return engine, log.getvalue()


def check_engine(engine, family: str, out_dir: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from dreambooth_a1111.forge_backend import ForgeBackend
    from dreambooth_core.config import TrainConfig
    from dreambooth_core.fileio import read_metadata
    from dreambooth_core.training.objective import FlowSchedule, shift_sigmas
    from dreambooth_core.training.trainer import train
    import network
    import networks
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

    torch.manual_seed(0)
    backend = ForgeBackend(engine)
    fo = engine.forge_objects
    kmodel = fo.unet.model
    predictor = kmodel.predictor
    schedule = backend.schedule()
    r = {"engine": type(engine).__name__, "family": backend.family, "native_resolution": backend.native_resolution,
         "schedule": type(schedule).__name__, "shift": schedule.shift, "predictor": type(predictor).__name__,
         "host_shift": float(getattr(predictor, "shift", None) or np.exp(predictor.mu)),  # Forge's own field
         "tokenizers": [type(t).__name__ for t in backend.tokenizers()]}
    # Forge's σ grid is the core's shifted σ, and its noising the core's line.
    ts = torch.arange(1, len(predictor.sigmas) + 1, dtype=torch.float64) / len(predictor.sigmas)
    r["sigmas_match"] = bool(torch.allclose(shift_sigmas(ts, schedule.shift).float(), predictor.sigmas.float(),
                                            atol=1e-6))
    x0, eps = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    sig = torch.tensor([0.3, 0.8])
    batch = FlowSchedule(shift=schedule.shift).noised(x0, eps, sig)
    r["noising_match"] = bool(torch.allclose(batch.noisy, predictor.noise_scaling(sig.view(-1, 1, 1, 1), eps, x0),
                                             atol=1e-6))
    # The prediction is the velocity Forge samples with: x − σ·v is KModel.apply_model's denoised x0.
    cond = backend.encode_text(["a photo of sks ball"], size=(64, 64))
    probe = (batch.noisy[:1], sig[:1])
    with torch.no_grad():
        before = backend.predict(*probe, cond)
        n = int(cond["context_len"][0])
        extra = {"y": cond["vector"]} if "vector" in cond else {}
        if "guidance" in cond:
            extra["guidance"] = cond["guidance"].reshape(-1)
        denoised = kmodel.apply_model(probe[0], probe[1], c_crossattn=cond["context"][:, :n], **extra)
    r["velocity_match"] = bool(torch.allclose(probe[0] - probe[1].view(-1, 1, 1, 1) * before, denoised, atol=1e-5))
    # A batch of captions of different text lengths (Chroma's: Forge pads no prompt) predicts each sample as alone.
    class_cond = backend.encode_text(["a photo of ball"], size=(64, 64))
    both = {k: torch.cat([cond[k], class_cond[k]]) for k in cond}
    with torch.no_grad():
        alone = backend.predict(batch.noisy[1:], sig[1:], class_cond)
        batched = backend.predict(batch.noisy, sig, both)
    r["batch_match"] = bool(torch.allclose(batched, torch.cat([before, alone]), atol=1e-5))
    r["class_text_len"] = int(class_cond["context_len"][0])
    refused = {}
    for setting in (dict(train_text_encoder=True), dict(mode="full")):
        try:
            ForgeBackend(engine, **setting)
        except ValueError as exc:
            refused[next(iter(setting))] = str(exc)
    r["refused"] = refused
    # Class images through the tab/API: the family's sampling where the request leaves it open.
    from dreambooth_a1111 import jobs

    sampled = {}
    for request in ({}, {"class_guidance": 6.0, "class_sampler": "DPM++ 2M"}):
        job_config = jobs._config(dict(request, token="sks", class_noun="ball"))
        jobs.apply_class_sampling(job_config, request, backend)
        sampled["given" if request else "open"] = [job_config.class_guidance, job_config.class_sampler]
    r["class_sampling"] = sampled
    r["cond_keys"] = sorted(cond)
    r["guidance"] = float(cond["guidance"][0, 0]) if "guidance" in cond else None
    r["text_len"] = n
    r["vector_width"] = int(cond["vector"].shape[-1]) if "vector" in cond else None

    class Item:
        def __init__(self, image, caption):
            self.image, self.caption = image, caption

    def disc(bg, colour):
        im = Image.new("RGB", (64, 64), bg)
        ImageDraw.Draw(im).ellipse((12, 14, 50, 52), fill=colour)
        return im

    instance = [Item(disc(bg, (200, 30, 30)), "a photo of sks ball") for bg in ((30, 90, 200), (40, 160, 60))]
    classes = [Item(disc(bg, (90, 90, 90)), "a photo of ball") for bg in ((200, 200, 200), (20, 20, 20))]
    name = f"db_{family.replace('-', '_')}"
    config = TrainConfig.from_mapping(dict(token="sks", class_noun="ball", steps=2, resolution=64, rank=4,
                                           learning_rate=5e-3, prior=True, output_dir=str(out_dir / name),
                                           save_name=name, sample_every=0,
                                           gradient_checkpointing="full" if family in ("flux", "sd35-large")
                                           else "off"),
                                      source="test")
    result = train(backend, config, instance, classes)
    history = result.history
    # Gradient checkpointing of the transformer's blocks gives the adapters the same gradient.
    params = [p for p in result.network.parameters()]
    grads = []
    for checkpointing in (False, True):
        backend.set_gradient_checkpointing(checkpointing)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        backend.predict(batch.noisy, sig, both).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    backend.set_gradient_checkpointing(False)
    r["checkpointing_grad_match"] = bool(torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
                                         and grads[0].abs().max() > 0)
    backend.release()
    with torch.no_grad():
        after_release = backend.predict(*probe, cond)
    lora_path = str(result.lora_path)
    lora_sd = networks.load_lora_state_dict(lora_path)  # the file, as Forge's LoRA support reads it
    metadata = read_metadata(lora_path)
    unet_keys = model_lora_keys_unet(kmodel, {})
    clip_keys = model_lora_keys_clip(fo.clip.cond_stage_model, {})
    patches_unet, rest = load_lora(dict(lora_sd), unet_keys)
    _, rest = load_lora(rest, clip_keys)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        unet, clip = networks.load_lora_for_models(fo.unet, fo.clip, dict(lora_sd), 1.0, 1.0, filename=name)
    unet.refresh_loras()
    with torch.no_grad():
        with_lora = backend.predict(*probe, cond)
    fo.unet.refresh_loras()  # the loaded model's own patcher (no patches): its weights back
    with torch.no_grad():
        unloaded = backend.predict(*probe, cond)
    untrained = [k for k, v in lora_sd.items() if k.endswith("lora_up.weight") and not v.abs().max() > 0]
    r.update({"steps": [h["step"] for h in history], "prior": [h["prior_loss"] for h in history],
              "losses_finite": bool(all(np.isfinite(h["loss"]) for h in history)),
              "modules": len({k.split(".")[0] for k in lora_sd}), "keys": sorted({k.split(".")[0] for k in lora_sd}),
              "unmatched": sorted(rest), "unet_patches": len(patches_unet), "lora_log": log.getvalue(),
              "n_untrained": len(untrained), "restored": bool(torch.equal(before, after_release)),
              "lora_change": float((with_lora - before).abs().mean()),
              "unloaded_equal": bool(torch.allclose(unloaded, before, atol=1e-6)),
              "metadata": {k: metadata.get(k) for k in ("ss_base_model_version", "modelspec.architecture",
                                                         "dreambooth_base_family")},
              "sd_version": network.NetworkOnDisk(name, lora_path).sd_version.name})
    return r


def main(forge: Path, out_dir: Path, checkpoints: Path) -> dict:
    from flow_checkpoint import FAMILIES, reduce_configs, tiny_guess

    reduce_configs(forge)
    tiny_guess()
    results = {}
    for family in FAMILIES:
        info = {"detected": FAMILIES[family][1]}  # flow_checkpoint.build checked it
        engine, load_log = load_engine(checkpoints / f"tiny_{family.replace('-', '_')}.safetensors")
        info["load_log_problems"] = [line for line in load_log.splitlines() if "Missing" in line or "Unexpected" in line]
        info["state_dict_keys"] = next(line for line in load_log.splitlines() if line.startswith("StateDict Keys:"))
        info.update(check_engine(engine, family, out_dir))
        results[family] = info
    return results


if __name__ == "__main__":
    forge = Path(sys.argv[1]).resolve()
    sys.path[:0] = [str(forge), str(forge / "packages_3rdparty"), str(forge / "repositories" / "huggingface_guess")]
    out, checkpoint_dir = Path(sys.argv[2]), Path(sys.argv[3])
    sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(HERE), str(forge / "extensions-builtin" / "sd_forge_lora")]
    sys.argv = [sys.argv[0], "--always-cpu", "--all-in-fp32"]  # what Forge's argument parsers read
    os.chdir(forge)
    from modules import shared_init

    shared_init.initialize()  # shared.opts: the text engines read the emphasis setting
    from modules import processing  # noqa: F401  (the WebUI's import order: before sd_models, which networks imports)
    print("RESULT " + json.dumps(main(forge, out, checkpoint_dir)))
