"""Single-file Stable Diffusion checkpoints (`.safetensors`, as ComfyUI and Automatic1111 keep them).

Supported: SD 1.x (512), SD 2.x (512 epsilon "base" or 768 v-prediction) and SDXL base (1024),
in the original (ldm) key layout: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.*` (SD1/SD2 text encoder) or `conditioner.embedders.{0,1}.*` (SDXL's two).

* `detect_checkpoint` reads only the safetensors header (key names and shapes; for SD2 one tiny
  tensor) and says which architecture the file holds, or raises `CheckpointError` with a message
  that names the file and says what to do.
* `load_single_file` builds a diffusers pipeline from the file with diffusers' own ldm->diffusers
  conversion (`StableDiffusionPipeline.from_single_file` / `StableDiffusionXLPipeline...`). It
  never goes to a model hub: the architecture configs it needs ship with this package
  (`assets/configs/<name>/`, diffusers format, copied from the official repos: sd1 =
  stable-diffusion-v1-5, sd2-base = stable-diffusion-2-1-base, sd2-v = stable-diffusion-2-1,
  sdxl = stable-diffusion-xl-base-1.0), and the tokenizers are built from the CLIP BPE files
  shipped in `assets/clip_tokenizer/` (SD1/SDXL-1 pad with "<|endoftext|>", SD2/SDXL-2 with "!",
  as read from each config's `tokenizer*/tokenizer_config.json`) and handed to diffusers as
  components, so the vocabulary is not copied into every config folder.

  The one deliberate deviation from the official text-encoder configs: bos/eos/pad ids are the
  real CLIP ids (49406/49407, pad 49407 or 0) instead of the legacy 0/2/1. For an ordinary prompt
  both pick the first end-of-text token for the pooled output (SDXL), so results are identical;
  the real ids stay correct if tokens are ever added to the vocabulary.

Prediction type. SD1.x and SDXL base are epsilon models, SD 2.x comes in both kinds, and the key
names cannot tell them apart. Like ComfyUI (`supported_models.SD20.model_type`), the SD2
heuristic reads `model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias`: a
population standard deviation above 0.09 means v-prediction (768), otherwise epsilon (512); if the
tensor is absent the answer is epsilon. A file that carries a `v_pred` marker tensor (as
v-prediction SDXL fine-tunes do; `ztsnr` additionally marks zero-terminal-SNR training) is read
as v-prediction for any architecture. The `prediction_type` argument overrides all of this.

Custom or reduced architectures: both functions take `config_dir`, a diffusers-format config
folder (model_index.json, unet/config.json, vae/config.json, text_encoder*/config.json,
scheduler/scheduler_config.json; tokenizer folders optional: without vocab files the shipped CLIP
tokenizer is used with the pad token of `tokenizer*/tokenizer_config.json`). Then the family
(sd1/sd2/sdxl) still comes from the key layout, but the tensor widths are not checked against the
official models; diffusers' conversion checks them against `config_dir` instead.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from ..embedded.model import ASSETS, clip_tokenizer
from .checkpoint_file import (
    SUPPORTED,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    Header,
    not_a_checkpoint,
    read_header,
    read_tensor,
)

CONFIGS_DIR = ASSETS / "configs"

SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_TE_PREFIX = "conditioner.embedders.0.model."
SD2_V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD_THRESHOLD = 0.09


#: cross-attention width (the text-embedding width the UNet expects) of each family
CONTEXT_DIM = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
#: shipped config folder -> native resolution in pixels
NATIVE_RESOLUTION = {"sd1": 512, "sd2-base": 512, "sd2-v": 768, "sdxl": 1024}
#: tokenizer subfolders of each family and the pad token each one uses
TOKENIZERS = {
    "sd1": (("tokenizer", "<|endoftext|>"),),
    "sd2": (("tokenizer", "!"),),
    "sdxl": (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")),
}
PREDICTION_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction",
                      "v": "v_prediction", "v-prediction": "v_prediction"}


@dataclass(frozen=True)
class CheckpointInfo:
    arch: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    native_resolution: int  # 512 / 768 / 1024
    config_name: str  # the shipped config folder used (assets/configs/<name>), or the custom config_dir
    zero_terminal_snr: bool = False  # the file carries a `ztsnr` marker (trained with zero terminal SNR)


def _normalize_prediction(prediction_type: Optional[str]) -> Optional[str]:
    if prediction_type is None or prediction_type == "":
        return None
    p = PREDICTION_ALIASES.get(str(prediction_type).strip().lower())
    if p is None:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction' (or None to detect it), "
                         f"not {prediction_type!r}")
    return p


def _custom_resolution(config_dir: Path, default: int) -> int:
    try:
        cfg = json.loads((config_dir / "vae" / "config.json").read_text())
        return int(cfg.get("sample_size") or default)
    except (OSError, ValueError, TypeError):
        return default


def detect_checkpoint(path, prediction_type: Optional[str] = None, *,
                      config_dir: Optional[os.PathLike | str] = None) -> CheckpointInfo:
    """Which Stable Diffusion family a single-file checkpoint holds, from its safetensors header.

    Reads key names and shapes only (and, for SD2, the one small tensor of the v-prediction
    heuristic). `prediction_type` ("epsilon"/"v_prediction") overrides the detected one; for SD2 it
    also picks the config (v -> 768 "sd2-v", epsilon -> 512 "sd2-base"). With `config_dir` (a
    custom/reduced diffusers config folder) widths are not checked against the official models.
    Raises CheckpointError (a ValueError) for anything that is not a supported checkpoint.
    """
    path = Path(path)
    override = _normalize_prediction(prediction_type)
    header = read_header(path)
    shapes = header.shapes
    keys = shapes.keys()

    if not any(k.startswith(UNET_PREFIX + "input_blocks.") for k in keys):
        raise not_a_checkpoint(path, keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    def unsupported(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}, which is not supported for training here. {SUPPORTED}")

    in_shape = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    in_channels = in_shape[1] if in_shape is not None and len(in_shape) == 4 else 4
    if in_channels != 4:
        kind = {9: "an inpainting model (9 input channels)", 8: "an InstructPix2Pix model (8 input channels)",
                5: "a depth-conditioned model (5 input channels)", 7: "an upscaler model (7 input channels)"}
        raise unsupported(kind.get(in_channels,
                                   f"a UNet with {in_channels} input channels (not a text-to-image model)"))
    if "edm_mean" in keys or "edm_std" in keys:
        raise unsupported("it is a Playground v2.5 (EDM) model")
    if "edm_vpred.sigma_max" in keys or "edm_vpred.sigma_min" in keys:
        raise unsupported("it is an EDM v-prediction model (e.g. CosXL)")
    if has("noise_augmentor.") or has("embedder.model."):
        raise unsupported("it is an unCLIP (image-variation) model")

    te_sdxl1, te_sdxl2 = has(SDXL_TE1_PREFIX), has(SDXL_TE2_PREFIX)
    if has(SDXL_REFINER_TE_PREFIX) and not te_sdxl2:
        raise unsupported("it is an SDXL refiner (it has only the OpenCLIP-bigG text encoder)")
    if te_sdxl1 or te_sdxl2 or has("conditioner."):
        if not (te_sdxl1 and te_sdxl2):
            missing = SDXL_TE1_PREFIX if not te_sdxl1 else SDXL_TE2_PREFIX
            raise CheckpointError(f"{path}: an SDXL checkpoint without its text encoder '{missing}*': the file is "
                                  f"incomplete (pruned of its text encoders?). Use a full SDXL checkpoint "
                                  f"(UNet + VAE + both text encoders).")
        arch = "sdxl"
    elif has(SD2_TE_PREFIX):
        arch = "sd2"
    elif has(SD1_TE_PREFIX):
        arch = "sd1"
    else:
        raise CheckpointError(f"{path}: the file has a UNet ('{UNET_PREFIX}*') but no text encoder "
                              f"('cond_stage_model.*' or 'conditioner.embedders.*'). A full checkpoint "
                              f"(UNet + VAE + text encoder) is needed. {SUPPORTED}")
    if not has(VAE_PREFIX):
        raise CheckpointError(f"{path}: the file has no VAE ('{VAE_PREFIX}*'). A full checkpoint (UNet + VAE + "
                              f"text encoder) is needed; put the VAE back into it, e.g. with ComfyUI's "
                              f"'Save Checkpoint' node.")

    context = None
    for k in sorted(keys):
        if k.startswith(UNET_PREFIX) and k.endswith(".attn2.to_k.weight") and len(shapes[k]) == 2:
            context = shapes[k][1]
            break
    if context is None:
        raise CheckpointError(f"{path}: the UNet has no cross-attention layers ('….attn2.to_k.weight'), so it is "
                              f"not a text-to-image Stable Diffusion UNet. {SUPPORTED}")
    if config_dir is None:
        if context != CONTEXT_DIM[arch]:
            raise CheckpointError(
                f"{path}: the tensors do not match the detected architecture: the text encoder keys say {arch}, "
                f"whose UNet cross-attention width is {CONTEXT_DIM[arch]}, but this UNet's is {context}. The file "
                f"is a broken merge or a different/reduced architecture; for a custom architecture pass "
                f"config_dir=<a diffusers config folder that describes it>.")
        if arch == "sdxl" and UNET_PREFIX + "label_emb.0.0.weight" not in keys:
            raise CheckpointError(f"{path}: SDXL text encoders but no SDXL UNet size embedding "
                                  f"('{UNET_PREFIX}label_emb.0.0.weight'): the tensors do not match SDXL base.")

    zsnr = "ztsnr" in keys
    if override is not None:
        prediction = override
    elif "v_pred" in keys:
        prediction = "v_prediction"
    elif arch == "sd2" and SD2_V_PROBE in keys:
        probe = read_tensor(path, SD2_V_PROBE).float()
        prediction = "v_prediction" if float(probe.std(unbiased=False)) > SD2_V_STD_THRESHOLD else "epsilon"
    else:
        prediction = "epsilon"

    if arch == "sd2":
        name = "sd2-v" if prediction == "v_prediction" else "sd2-base"
    else:
        name = arch
    resolution = NATIVE_RESOLUTION[name]
    if config_dir is not None:
        cdir = Path(config_dir)
        return CheckpointInfo(arch, prediction, _custom_resolution(cdir, resolution), str(cdir), zsnr)
    return CheckpointInfo(arch, prediction, resolution, name, zsnr)


# --------------------------------------------------------------------------------------------
# loading


def _tokenizer(config_dir: Path, sub: str, default_pad: str):
    """The tokenizer component for `sub`, or None when `config_dir` has full tokenizer files of its own."""
    folder = config_dir / sub
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return None  # diffusers loads it from the folder
    pad = default_pad
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        pad = json.loads(cfg.read_text()).get("pad_token", default_pad)
        if isinstance(pad, dict):  # AddedToken serialised
            pad = pad.get("content", default_pad)
    return clip_tokenizer(pad)


def _flat_clip_text_encoder(path: Path, prefix: str, config_dir: Path, sub: str, torch_dtype):
    """A CLIP-L text encoder stored without the 'text_model.' level ('cond_stage_model.transformer.embeddings.…',
    as some SD1 merges have it; ComfyUI renames these too): add the level back, then convert with diffusers."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open
    from transformers import CLIPTextModel

    state = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                if not rest.startswith("text_model."):
                    rest = "text_model." + rest
                state[SD1_TE_PREFIX + rest] = f.get_tensor(key)
    return create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint=state, subfolder=sub,
                                                config=str(config_dir), torch_dtype=torch_dtype,
                                                local_files_only=True)


def _check_complete(pipe, path: Path, info: CheckpointInfo) -> None:
    """diffusers leaves parameters that the file lacked on the meta device; say so instead of failing later."""
    import itertools

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        missing = [n for n, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
        if missing:
            raise CheckpointError(
                f"{path}: the file lacks {len(missing)} {name} tensors that the {info.arch} architecture "
                f"({info.config_name}) needs, e.g. {', '.join(missing[:3])}. It is incomplete (pruned or damaged) "
                f"or a different architecture: use a complete checkpoint, or pass config_dir=<a diffusers config "
                f"folder that describes it>.")


def _diagnose(header: Header, config_dir: Path) -> Optional[str]:
    """After diffusers failed: run its own UNet/VAE converters on the header's names and shapes (meta
    tensors, no data) against models built from the config, and say which tensors are missing or
    have the wrong shape. None when that finds nothing."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    meta = {k: torch.empty(s, device="meta") for k, s in header.shapes.items()
            if k.startswith((UNET_PREFIX, VAE_PREFIX))}
    problems = []
    for name, cls, convert in (("unet", UNet2DConditionModel, convert_ldm_unet_checkpoint),
                               ("vae", AutoencoderKL, convert_ldm_vae_checkpoint)):
        config = cls.load_config(str(config_dir), subfolder=name)
        with init_empty_weights():
            want = cls.from_config(config).state_dict()
        try:
            got = {k: v for k, v in convert(meta, config).items() if v is not None}
        except Exception as e:  # noqa: BLE001
            problems.append(f"the {name} tensors cannot be mapped onto the architecture ({type(e).__name__}: {e})")
            continue
        missing = [k for k in want if k not in got]
        wrong = [f"{k} {tuple(got[k].shape)} instead of {tuple(want[k].shape)}" for k in want
                 if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
        if missing:
            problems.append(f"the file lacks {len(missing)} {name} tensors (e.g. {', '.join(missing[:3])})")
        if wrong:
            problems.append(f"{len(wrong)} {name} tensors have other shapes (e.g. {'; '.join(wrong[:2])})")
    return "; ".join(problems) or None


def _apply_schedule(pipe, info: CheckpointInfo) -> None:
    import inspect

    scheduler = pipe.scheduler
    changes: Dict[str, Any] = {}
    if scheduler.config.get("prediction_type") != info.prediction_type:
        changes["prediction_type"] = info.prediction_type
    cls = type(scheduler)
    if info.zero_terminal_snr and not scheduler.config.get("rescale_betas_zero_snr", False):
        if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
            from diffusers import DDIMScheduler

            cls = DDIMScheduler
        changes["rescale_betas_zero_snr"] = True
    if changes:
        pipe.scheduler = cls.from_config(scheduler.config, **changes)


def load_single_file(path, prediction_type: Optional[str] = None, torch_dtype=None, *,
                     config_dir: Optional[os.PathLike | str] = None):
    """Load a single-file SD1.x/SD2.x/SDXL checkpoint as a diffusers pipeline; nothing is downloaded.

    Returns (pipeline, CheckpointInfo): a StableDiffusionPipeline (sd1, sd2) or a
    StableDiffusionXLPipeline (sdxl), without safety checker or watermarker, whose scheduler has the
    detected (or given) prediction type. `torch_dtype` is passed to diffusers (None keeps the
    file's own dtype per tensor as diffusers does: fp32 models stay fp32, fp16 files load as fp16).
    `config_dir`: a diffusers config folder for a custom/reduced architecture (see the module doc);
    by default the shipped config of the detected family is used.
    Raises CheckpointError, naming the file, for anything that cannot be loaded.
    """
    path = Path(path)
    info = detect_checkpoint(path, prediction_type, config_dir=config_dir)
    cfg = Path(config_dir) if config_dir is not None else CONFIGS_DIR / info.config_name
    if not (cfg / "model_index.json").is_file():
        raise ValueError(f"config_dir {cfg} is not a diffusers config folder (it has no model_index.json)")
    if path.suffix != ".safetensors":  # diffusers picks its reader by this exact suffix
        raise CheckpointError(f"{path}: the file is valid safetensors but its name does not end in '.safetensors'; "
                              f"rename it to {path.with_suffix('.safetensors').name}.")

    from .pipelines import pipeline_classes

    StableDiffusionPipeline, StableDiffusionXLPipeline = pipeline_classes()
    components: Dict[str, Any] = {}
    for sub, pad in TOKENIZERS[info.arch]:
        tok = _tokenizer(cfg, sub, pad)
        if tok is not None:
            components[sub] = tok
    header = read_header(path)
    te1_prefix = SDXL_TE1_PREFIX if info.arch == "sdxl" else SD1_TE_PREFIX
    if info.arch in ("sd1", "sdxl") and not any(k.startswith(te1_prefix + "text_model.") for k in header.shapes):
        try:
            components["text_encoder"] = _flat_clip_text_encoder(path, te1_prefix, cfg, "text_encoder", torch_dtype)
        except Exception as e:  # noqa: BLE001 - any failure here is the file's
            raise CheckpointError(f"{path}: its text encoder ('{te1_prefix}*') could not be loaded as {info.arch}: "
                                  f"{type(e).__name__}: {e}") from e

    pipeline_class = StableDiffusionXLPipeline if info.arch == "sdxl" else StableDiffusionPipeline
    extra = {"add_watermarker": False} if info.arch == "sdxl" else {}
    try:
        pipe = pipeline_class.from_single_file(str(path), config=str(cfg), local_files_only=True,
                                               torch_dtype=torch_dtype, **extra, **components)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers raises ValueError, KeyError, RuntimeError, its own errors…
        try:
            detail = _diagnose(header, cfg)
        except Exception:  # noqa: BLE001 - the diagnosis is a courtesy; diffusers' error is the message
            detail = None
        raise CheckpointError(
            f"{path}: could not be loaded as {info.arch} ({info.config_name}): "
            f"{detail or 'its tensors do not match that architecture'}. "
            f"diffusers said: {type(e).__name__}: {str(e).strip().rstrip('.')}. "
            f"The file is incomplete (pruned or damaged: download or copy it again) or a different/modified "
            f"architecture (pass config_dir=<a diffusers config folder that describes it>).") from e
    _check_complete(pipe, path, info)
    _apply_schedule(pipe, info)
    return pipe, info


__all__ = ["CheckpointInfo", "CheckpointError", "detect_checkpoint", "load_single_file", "CONFIGS_DIR"]
