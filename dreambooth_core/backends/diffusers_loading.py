"""Loading the standalone backend's model from disk (nothing is ever downloaded): the embedded toy
model, a diffusers folder, or a single-file SD1.x/SD2.x/SDXL `.safetensors` checkpoint; and only its
tokenizers, enough to check an identifier without loading weights."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..embedded import model as embedded
from .diffusers_backend import DiffusersBackend


class ModelLoadError(ValueError):
    pass


def _file_fingerprint(paths: Sequence[Path]) -> str:
    """Hash of sizes and three 1 MiB windows of each weight file: stable and fast for GB files."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - 2**19), max(0, size - 2**20)}):
                f.seek(offset)
                h.update(f.read(2**20))
    return h.hexdigest()[:16]


def _resolution_of(unet, latent_factor: int, default: int) -> int:
    size = getattr(unet.config, "sample_size", None)
    return int(size * latent_factor) if isinstance(size, int) else default


def load_backend(model: Optional[str] = None, *, device: Optional[torch.device] = None,
                 weight_dtype: torch.dtype = torch.float32, prediction_type: Optional[str] = None) -> DiffusersBackend:
    """Load the embedded model (default), a diffusers folder, or a single-file checkpoint."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if embedded.is_embedded(model):
        path = embedded.EMBEDDED_MODEL_DIR
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"the embedded model is missing from {path}; reinstall the package or "
                                 "rebuild it with tools/pretrain_toy_model.py")
        return _from_folder(path, embedded.EMBEDDED_NAME, device, weight_dtype, prediction_type)
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file() or not (p / "unet").is_dir():
            raise ModelLoadError(f"--model {model}: a folder must be a diffusers model (model_index.json, "
                                 "unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        return _from_folder(p, p.name, device, weight_dtype, prediction_type)
    if p.is_file() or p.suffix:
        from . import single_file

        try:
            pipe, info = single_file.load_single_file(p, prediction_type=prediction_type)
        except single_file.CheckpointError as exc:
            raise ModelLoadError(str(exc)) from exc
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if info.arch == "sdxl" else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if info.arch == "sdxl" else [])
        return DiffusersBackend(unet=pipe.unet, vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers,
                                scheduler_config=dict(pipe.scheduler.config), name=p.stem,
                                fingerprint=_file_fingerprint([p]), native_resolution=info.native_resolution,
                                arch="sdxl" if info.arch == "sdxl" else "sd", device=device,
                                weight_dtype=weight_dtype)
    raise ModelLoadError(f"--model {model}: no such file or folder. Give 'embedded', a diffusers folder or a "
                         ".safetensors checkpoint (SD1.x, SD2.x or SDXL)")


def _from_folder(path: Path, name: str, device, weight_dtype, prediction_type) -> DiffusersBackend:
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    index = json.loads((path / "model_index.json").read_text())
    sdxl = "text_encoder_2" in index and index["text_encoder_2"][0] is not None
    kw = dict(torch_dtype=torch.float32, local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)]
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)]
    if sdxl:
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw))
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True))
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    if prediction_type:
        scheduler_config["prediction_type"] = prediction_type
    weights = [p for p in path.rglob("*.safetensors")]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return DiffusersBackend(unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                            scheduler_config=scheduler_config, name=name, fingerprint=_file_fingerprint(weights),
                            native_resolution=_resolution_of(unet, factor, 1024 if sdxl else 512),
                            arch="sdxl" if sdxl else "sd", device=device, weight_dtype=weight_dtype)


def load_tokenizers(model: Optional[str] = None) -> list:
    """Only the tokenizer(s) of a model: enough to check an identifier without loading weights."""
    if embedded.is_embedded(model):
        return [embedded.clip_tokenizer()]
    p = Path(model).expanduser()
    if p.is_dir():
        from transformers import AutoTokenizer

        names = [n for n in ("tokenizer", "tokenizer_2") if (p / n).is_dir()]
        if not names:
            raise ModelLoadError(f"--model {model}: no tokenizer/ folder; is it a diffusers model folder?")
        return [AutoTokenizer.from_pretrained(p, subfolder=n, local_files_only=True) for n in names]
    from . import single_file

    try:
        info = single_file.detect_checkpoint(p)
    except single_file.CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc
    if info.arch == "sdxl":
        return [embedded.clip_tokenizer(), embedded.clip_tokenizer("!")]
    return [embedded.clip_tokenizer("!" if info.arch == "sd2" else "<|endoftext|>")]
