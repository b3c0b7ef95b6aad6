"""The models the benchmark trains, as diffusers folders on disk (what both trainers load).

- ``embedded``: the project's default model, ``dreambooth_core/assets/toy_model`` (a standard
  diffusers folder). Where it is missing (it is built by tools/pretrain_toy_model.py), a tiny
  seeded random model of the same layout stands in, and the report says so.
- ``sd15``: seeded random weights with Stable Diffusion 1.5's real shapes (UNet 859.5 M, VAE
  83.7 M, CLIP-L text encoder 123.1 M parameters), from the shipped architecture configs
  ``dreambooth_core/assets/configs/sd1`` and the shipped CLIP tokenizer.
- ``sdxl``: the same for SDXL (``configs/sdxl``): for CUDA machines with the memory for it.

Random weights train at exactly the speed and memory of the real ones: cost depends on shapes,
not values. Each folder is written once (to a temporary name, then renamed) into a cache folder
and reused by later runs: ``$BENCH_CACHE`` or ``~/.cache/dreambooth-bench``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "dreambooth_core" / "assets" / "configs"
VERSION = "bench-models-v1"


def cache_root() -> Path:
    root = Path(os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "dreambooth-bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def embedded_dir() -> Path:
    return REPO / "dreambooth_core" / "assets" / "toy_model"


def embedded_available() -> bool:
    return (embedded_dir() / "model_index.json").is_file()


def _key(arch: str, seed: int) -> str:
    import torch

    h = hashlib.sha256()
    h.update(f"{VERSION}:{arch}:{seed}:{torch.__version__}".encode())
    if arch == "tiny":  # the embedded model's architecture, as the package defines it now
        from dreambooth_core.embedded import model as embedded

        h.update(repr([embedded.UNET_CONFIG, embedded.VAE_CONFIG, embedded.TEXT_ENCODER_CONFIG,
                       embedded.SCHEDULER_CONFIG]).encode())
    folder = CONFIGS / ("sd1" if arch == "sd15" else arch)
    if folder.is_dir():
        for p in sorted(folder.rglob("*.json")):
            h.update(p.read_bytes())
    return f"{arch}-seed{seed}-{h.hexdigest()[:10]}"


def _complete(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / ".complete").is_file()


def ensure_model(arch: str, seed: int = 0, log=print) -> Path:
    """A diffusers folder of `arch` ("sd15", "sdxl", "tiny") with seeded random weights, cached."""
    dest = cache_root() / _key(arch, seed)
    if _complete(dest):
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"writing a seeded random {arch} model to {dest} (once; cached for later runs)")
    pipe = build_pipeline(arch, seed)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / ".complete").write_text(json.dumps({"arch": arch, "seed": seed, "version": VERSION}))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def _config(arch: str, part: str) -> dict:
    data = json.loads((CONFIGS / arch / part / "config.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def build_pipeline(arch: str, seed: int = 0):
    import torch
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           EulerDiscreteScheduler, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_core.embedded.model import clip_tokenizer

    if arch == "tiny":
        return _tiny_pipeline(seed)
    if arch == "tiny-sdxl":
        return _tiny_sdxl_pipeline(seed)
    folder = {"sd15": "sd1", "sdxl": "sdxl"}[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_config(folder, "unet"))
        vae = AutoencoderKL(**_config(folder, "vae"))
        te_cfg = CLIPTextConfig(**_config(folder, "text_encoder"))
        text_encoder = CLIPTextModel(te_cfg)
        sched = json.loads((CONFIGS / folder / "scheduler" / "scheduler_config.json").read_text())
        if arch == "sd15":
            return StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                           scheduler=PNDMScheduler.from_config(sched), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config(folder, "text_encoder_2")))
        return StableDiffusionXLPipeline(vae=vae, unet=unet, text_encoder=text_encoder, text_encoder_2=te2,
                                         tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"),
                                         scheduler=EulerDiscreteScheduler.from_config(sched))


def _tiny_pipeline(seed: int):
    """A tiny SD-layout model (the stand-in for the embedded model while it is missing)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth_core.embedded import model as embedded

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**embedded.UNET_CONFIG)
        vae = AutoencoderKL(**embedded.VAE_CONFIG)
        te = CLIPTextModel(CLIPTextConfig(**embedded.TEXT_ENCODER_CONFIG))
    return StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=te, tokenizer=embedded.clip_tokenizer(),
                                   scheduler=DDPMScheduler(**embedded.SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _tiny_sdxl_pipeline(seed: int):
    """A tiny SDXL-layout model (two text encoders, pooled + size conditioning): to check the SDXL
    path of both trainers on a CPU (`--models tiny-sdxl`); the real shapes need a GPU."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_core.embedded.model import clip_tokenizer

    te = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
            transformer_layers_per_block=(1, 1))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=8, sample_size=32)
        te1 = CLIPTextModel(CLIPTextConfig(**te))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te, projection_dim=32))
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, unet=unet, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"), scheduler=sched)


def model_folder(name: str, log=print) -> tuple[Path, str]:
    """(folder, label) of a benchmark model name: embedded | sd15 | sdxl."""
    if name == "embedded":
        if embedded_available():
            return embedded_dir(), "embedded"
        log("the embedded model is missing (dreambooth_core/assets/toy_model): a tiny seeded random model "
            "of the same architecture stands in for it")
        return ensure_model("tiny", log=log), "embedded-arch (random; toy_model missing)"
    if name == "tiny-sdxl":
        return ensure_model("tiny-sdxl", log=log), "SDXL-arch (tiny random)"
    if name in ("sd15", "sdxl"):
        return ensure_model(name, log=log), {"sd15": "SD1.5-shaped (random)", "sdxl": "SDXL-shaped (random)"}[name]
    raise ValueError(f"model {name!r}: choose embedded, sd15 or sdxl")


def native_resolution(folder: Path) -> int:
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def param_count(folder: Path, part: str) -> Optional[int]:
    """Parameters of one component, read from the safetensors header (no weights loaded)."""
    total = 0
    files = list((folder / part).glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                size = 1
                for d in v["shape"]:
                    size *= d
                total += size
    return total
