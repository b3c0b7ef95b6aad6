"""The models whose step is estimated: real architectures at full size (SD1.5 and SDXL from the
shipped diffusers configs, Flux dev's transformer from its published config, written here), and
reduced ones of the same layouts that a CPU can train for the self-check.

`build(spec, dtype, meta)` makes the backend the trainer would get: on the meta device (no memory;
`fake.make_fake` then gives it fake tensors) or with real seeded CPU weights."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple

import torch

from . import fake

CONFIGS = Path(__file__).resolve().parents[2] / "dreambooth_core" / "assets" / "configs"

# black-forest-labs/FLUX.1-dev, transformer/config.json (12.0 B parameters)
FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_TEXT_TOKENS = 512  # T5 tokens Flux dev trains with (kohya's default, our flow path's cap)


@dataclass(frozen=True)
class Spec:
    """One model: its layout ("sd", "sdxl", "flux"), where its configs come from, its size."""

    key: str
    label: str
    kind: str  # "sd" | "sdxl" | "flux"
    resolution: int
    configs: Dict[str, dict] = field(default_factory=dict, hash=False, compare=False)
    text_tokens: int = 77


def _shipped(folder: str, part: str) -> dict:
    path = CONFIGS / folder / part / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"architecture {folder!r}: {path} is missing (dreambooth_core/assets/configs)")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _sd_parts(folder: str, sdxl: bool) -> Dict[str, dict]:
    parts = {p: _shipped(folder, p) for p in ("unet", "vae", "text_encoder")}
    if sdxl:
        parts["text_encoder_2"] = _shipped(folder, "text_encoder_2")
    parts["scheduler"] = json.loads((CONFIGS / folder / "scheduler" / "scheduler_config.json").read_text())
    return parts


def real_specs() -> Dict[str, Spec]:
    return {
        "sd15": Spec("sd15", "SD1.5", "sd", 512, _sd_parts("sd1", False)),
        "sdxl": Spec("sdxl", "SDXL", "sdxl", 1024, _sd_parts("sdxl", True)),
        "flux": Spec("flux", "Flux dev", "flux", 1024, {"transformer": dict(FLUX_DEV)}, FLUX_TEXT_TOKENS),
    }


_TINY_TE = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=1, norm_num_groups=4, sample_size=64)
_SCHED = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              prediction_type="epsilon")


def reduced_specs() -> Dict[str, Spec]:
    """Small models of the three layouts: SD1.5's blocks (cross-attention at every level but the
    last), SDXL's (text-time embedding, linear projections, several transformer layers), Flux's
    (double and single blocks, rotary embeddings, guidance)."""
    sd_unet = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    xl_unet = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                   attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
                   addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=80, transformer_layers_per_block=(1, 2))
    flux = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))
    return {
        "sd15": Spec("tiny-sd15", "SD1.5-layout UNet (reduced)", "sd", 256,
                     {"unet": sd_unet, "vae": _TINY_VAE, "text_encoder": _TINY_TE, "scheduler": _SCHED}),
        "sdxl": Spec("tiny-sdxl", "SDXL-layout UNet (reduced)", "sdxl", 256,
                     {"unet": xl_unet, "vae": _TINY_VAE, "text_encoder": _TINY_TE,
                      "text_encoder_2": dict(_TINY_TE, projection_dim=32), "scheduler": _SCHED}),
        "flux": Spec("tiny-flux", "Flux-layout transformer (reduced)", "flux", 256, {"transformer": flux}, 32),
    }


def latent_shape(spec: Spec) -> Tuple[int, int, int]:
    """(C, H, W) of one sample's latents at the spec's resolution."""
    side = spec.resolution // 8
    if spec.kind == "flux":
        return (spec.configs["transformer"]["in_channels"] // 4, side, side)
    return (spec.configs["unet"]["in_channels"], side, side)


def cond_shapes(spec: Spec) -> Dict[str, Tuple[int, ...]]:
    """One caption's cached conditioning, shaped as the backend's encode_text returns it."""
    if spec.kind == "flux":
        t = spec.configs["transformer"]
        return {"context": (1, spec.text_tokens, t["joint_attention_dim"]), "pooled": (1, t["pooled_projection_dim"])}
    unet = spec.configs["unet"]
    shapes = {"context": (1, spec.text_tokens, unet["cross_attention_dim"])}
    if spec.kind == "sdxl":
        te2 = spec.configs["text_encoder_2"]
        shapes.update(pooled=(1, te2.get("projection_dim", te2["hidden_size"])), time_ids=(1, 6))
    return shapes


def _sd_modules(spec: Spec):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = spec.configs
    unet = UNet2DConditionModel(**c["unet"])
    vae = AutoencoderKL(**c["vae"])
    encoders = [CLIPTextModel(CLIPTextConfig(**c["text_encoder"]))]
    if spec.kind == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"])))
    return unet, vae, encoders


def build(spec: Spec, dtype: torch.dtype, meta: bool, seed: int = 0):
    """The backend of `spec` with its frozen weights in `dtype` (meta: no memory; else seeded)."""
    def make():
        if spec.kind == "flux":
            from diffusers import FluxTransformer2DModel

            return FluxTransformer2DModel(**spec.configs["transformer"])
        return _sd_modules(spec)

    if meta:
        parts = fake.build_on_meta(make, dtype)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            parts = make()
        for m in (parts if isinstance(parts, tuple) else (parts,)):
            for mod in (m if isinstance(m, list) else [m]):
                mod.to(dtype)
    if spec.kind == "flux":
        from .flux_backend import FluxBackend

        return FluxBackend(parts, native_resolution=spec.resolution)
    from dreambooth_core.backends.diffusers_backend import DiffusersBackend

    unet, vae, encoders = parts
    return DiffusersBackend(unet=unet, vae=vae, text_encoders=encoders, tokenizers=[],
                            scheduler_config=spec.configs["scheduler"], name=spec.label, fingerprint=spec.key,
                            native_resolution=spec.resolution, arch="sdxl" if spec.kind == "sdxl" else "sd",
                            device=torch.device("meta") if meta else torch.device("cpu"), weight_dtype=dtype)


def modules_of(backend) -> Tuple[list, list]:
    """(the modules the step runs, the frozen encoders the step does not run)."""
    if hasattr(backend, "transformer"):
        return [backend.transformer], []
    return [backend.unet], [backend.vae, *backend.text_encoders]

