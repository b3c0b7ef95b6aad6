"""Flux dev, Flux schnell and Chroma loaded by Forge's own loader from tiny checkpoints, trained through the
extension's ForgeBackend, in one process (test code, Forge's venv; run by test_forge_flow.py in a writable
copy of Forge). Prints `RESULT {json}`.

Each checkpoint has the real single-file layout (`model.diffusion_model.*` in BFL's key names,
`text_encoders.clip_l.*` / `text_encoders.t5xxl.*`, `vae.*`), built from Forge's own classes, so
`huggingface_guess` detects it (Flux with `guidance_in`, FluxSchnell without it, and Chroma through
Forge's own fallback for its `distilled_guidance_layer`), and `backend.loader.forge_loader` builds
Forge's `Flux` / `Chroma` engine from it, as it does for a user's file. Two pieces of test scaffolding
keep it small:
- the pinned huggingface_guess (2024-08) writes Flux's full-size transformer config (hidden 3072, 19 + 38
  blocks) whatever the weights: `huggingface_guess.guess` is wrapped to put the tiny sizes in (and Forge's
  `GuessChroma` extra config likewise);
- Forge builds the text encoders and the VAE from the configs in its `backend/huggingface/<repo>/` folders
  (T5-XXL alone is 4.7B parameters): in the writable copy those three config.json files are replaced by
  reduced ones (TINY_CONFIGS: CLIP-L 32 wide, T5 32 wide with 2 layers, VAE of 32 channels with Flux's
  16 latent channels, scale and shift). Tokenizers, scheduler and model_index are Forge's own.
Then each engine is checked: the schedule and prediction against Forge's own PredictionFlux and
`KModel.apply_model`, a LoRA trained with prior preservation, its file loaded by Forge's built-in LoRA
support (`extensions-builtin/sd_forge_lora/networks.load_lora_for_models`) with every key used, changing
the prediction, and the engine as before after `release()`.
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
REPOS = {"flux": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell",
         "chroma": "Chroma"}
TINY_CONFIGS = {
    "clip": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, projection_dim=32),
    "t5": dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2),
    "vae": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1),
}
TINY_TRANSFORMER = dict(in_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=2,
                        depth=1, depth_single_blocks=2, axes_dim=[4, 14, 14], theta=10000, qkv_bias=True)
TINY_CHROMA = dict(guidance_out_dim=64, guidance_hidden_dim=32, guidance_n_layers=2)


def reduce_configs(forge: Path) -> None:
    """The text encoders' and VAE's configs of the three repos, reduced (in the writable copy only)."""
    for repo in REPOS.values():
        folder = forge / "backend" / "huggingface" / repo
        index = json.loads((folder / "model_index.json").read_text())
        for part, (lib, cls) in ((k, v) for k, v in index.items() if isinstance(v, list)):
            kind = {"CLIPTextModel": "clip", "T5EncoderModel": "t5", "AutoencoderKL": "vae"}.get(cls)
            if kind is None:
                continue
            path = folder / part / "config.json"
            config = json.loads(path.read_text())
            config.update(TINY_CONFIGS[kind])
            path.unlink()  # a copy of the read-only original: replace it, never write through it
            path.write_text(json.dumps(config, indent=1))


def tiny_guess() -> None:
    """huggingface_guess.guess with the tiny transformer's sizes put into its Flux config (see above)."""
    import huggingface_guess
    from backend import loader

    real = huggingface_guess.guess

    def guess(sd):
        result = real(sd)
        if type(result).__name__ in ("Flux", "FluxSchnell"):
            result.unet_config = dict(result.unet_config, **TINY_TRANSFORMER)
        return result

    huggingface_guess.guess = guess
    if hasattr(loader, "GuessChroma"):
        loader.GuessChroma.unet_extra_config = dict(TINY_CHROMA)


def build_checkpoint(forge: Path, family: str, path: Path) -> dict:
    """The tiny checkpoint's tensors (seeded), written to `path`; returns what huggingface_guess detects."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.nn.chroma import IntegratedChromaTransformer2DModel
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.utils import read_arbitrary_config
    from sdxl_engine import _seeded

    folder = forge / "backend" / "huggingface" / REPOS[family]
    index = json.loads((folder / "model_index.json").read_text())
    t5_part = next(k for k, v in index.items() if isinstance(v, list) and v[1] == "T5EncoderModel")
    if family == "chroma":
        transformer = IntegratedChromaTransformer2DModel(**TINY_TRANSFORMER, **TINY_CHROMA)
    else:
        transformer = IntegratedFluxTransformer2DModel(**TINY_TRANSFORMER, guidance_embed=family == "flux")
    parts = [("model.diffusion_model.", transformer),
             ("text_encoders.t5xxl.", IntegratedT5(read_arbitrary_config(str(folder / t5_part)))),
             ("vae.", IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(str(folder / "vae"))))]
    if family != "chroma":
        parts.append(("text_encoders.clip_l.", IntegratedCLIP(
            CLIPTextModel, CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))))
    sd = {}
    for prefix, module in parts:
        for k, v in _seeded(module.state_dict()).items():
            if k == "logit_scale" or k.endswith("position_ids"):  # not in released files
                continue
            sd[prefix + k] = v.float().contiguous()
    save_file(sd, str(path))
    import huggingface_guess

    return {"detected": type(huggingface_guess.guess(dict(sd))).__name__}


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
         "schedule": type(schedule).__name__, "shift": schedule.shift, "mu": float(predictor.mu)}
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
    # A batch of captions of different T5 lengths (Chroma's: Forge pads no prompt) predicts each sample as alone.
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
                                           gradient_checkpointing="full" if family == "flux" else "off"),
                                      source="test")
    result = train(backend, config, instance, classes)
    history = result.history
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


def main(forge: Path, out_dir: Path) -> dict:
    sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(HERE),
                    str(forge / "extensions-builtin" / "sd_forge_lora")]
    reduce_configs(forge)
    tiny_guess()
    results = {}
    for family in REPOS:
        path = out_dir / f"tiny_{family}.safetensors"
        info = build_checkpoint(forge, family, path)
        engine, load_log = load_engine(path)
        info["load_log_problems"] = [line for line in load_log.splitlines() if "Missing" in line or "Unexpected" in line]
        info.update(check_engine(engine, family, out_dir))
        results[family] = info
    return results


if __name__ == "__main__":
    forge = Path(sys.argv[1]).resolve()
    sys.path[:0] = [str(forge), str(forge / "packages_3rdparty"), str(forge / "repositories" / "huggingface_guess")]
    out = Path(sys.argv[2])
    sys.argv = [sys.argv[0], "--always-cpu", "--all-in-fp32"]  # what Forge's argument parsers read
    os.chdir(forge)
    from modules import shared_init

    shared_init.initialize()  # shared.opts: the text engines read the emphasis setting
    from modules import processing  # noqa: F401  (the WebUI's import order: before sd_models, which networks imports)
    print("RESULT " + json.dumps(main(forge, out)))
