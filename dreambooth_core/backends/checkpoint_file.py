"""What a single-file checkpoint is, read from its safetensors header alone: refusing pickle files,
naming a damaged, truncated, GGUF, LoRA, embedding, VAE-only or other-architecture file for what it
is, and reading one tensor without loading the rest. `single_file` builds on it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SUPPORTED = ("Supported are full single-file checkpoints of Stable Diffusion 1.x, Stable Diffusion 2.x "
             "(512 base or 768 v-prediction) and SDXL base 1.0 (and fine-tunes/merges of these).")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and says what to do."""


@dataclass(frozen=True)
class Header:
    shapes: Dict[str, Tuple[int, ...]]
    metadata: Dict[str, str]


def _pickle_message(path: Path, what: str) -> str:
    out = path.with_suffix(".safetensors")
    return (f"{path}: {what}. Only .safetensors checkpoints are loaded, because pickle files "
            f"(.ckpt/.pt/.pth/.bin) can run arbitrary code when they are opened. Convert it once, from a "
            f"source you trust, e.g. load it in ComfyUI and save it with the 'Save Checkpoint' node, or run: "
            f"python -c \"import torch, safetensors.torch as st; d = torch.load(r'{path}', map_location='cpu', "
            f"weights_only=True); d = d.get('state_dict', d); st.save_file({{k: v.clone().contiguous() for k, v "
            f"in d.items() if torch.is_tensor(v)}}, r'{out}')\"")


def _check_path(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file. Give the path of a Stable Diffusion checkpoint "
                              f"(.safetensors), e.g. one from ComfyUI/models/checkpoints/.")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            raise CheckpointError(f"{path}: this is a diffusers model folder, not a single-file checkpoint; "
                                  f"load it as a diffusers folder instead.")
        raise CheckpointError(f"{path}: this is a folder; give the path of the checkpoint file (.safetensors) in it.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(_pickle_message(path, f"is a {path.suffix} (pickle) file"))


def read_header(path: Path) -> Header:
    """Parse the safetensors header (8-byte little-endian length + JSON) without touching tensor data."""
    _check_path(path)
    size = path.stat().st_size
    how = ("It is not a valid safetensors file (damaged, truncated or not a checkpoint at all): "
           "download or copy it again.")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                # not a safetensors header; say what it is when the first bytes tell
                if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
                    raise CheckpointError(_pickle_message(path, "is a PyTorch pickle file, whatever its name says"))
                if head[:4] == b"GGUF":
                    raise CheckpointError(f"{path}: this is a GGUF (quantized) file, which cannot be trained. "
                                          f"{SUPPORTED}")
                if len(head) < 8:
                    raise CheckpointError(f"{path}: the file is only {size} bytes long. {how}")
                raise CheckpointError(f"{path}: its first 8 bytes give a header length of {n} bytes, but the file is "
                                      f"{size} bytes long. {how}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e}).") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: its header is not valid JSON ({e}). {how}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its header is not a JSON object. {how}")
    metadata = header.pop("__metadata__", None) or {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    end = 0
    for key, entry in header.items():
        try:
            shape = tuple(int(s) for s in entry["shape"])
            start, stop = (int(o) for o in entry["data_offsets"])
            str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the header entry for {key!r} is malformed. {how}") from e
        shapes[key] = shape
        end = max(end, stop, start)
    available = size - 8 - n
    if end > available:
        raise CheckpointError(f"{path}: the header describes {end} bytes of tensor data but only {available} follow: "
                              f"the file is truncated (an interrupted download or copy?). Download or copy it again.")
    if not shapes:
        raise CheckpointError(f"{path}: the file holds no tensors. {SUPPORTED}")
    return Header(shapes, metadata if isinstance(metadata, dict) else {})


def read_tensor(path: Path, key: str):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: tensor {key!r} cannot be read ({e}). The file is damaged: "
                              f"download or copy it again.") from e


_LORA_MARKERS = ("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", "lora_A.", "lora_B.", ".lora.down.",
                 ".lora.up.", ".hada_w1", ".lokr_w1", "lora_transformer_", ".oft_", ".loha_")
_EMBEDDING_KEYS = {"emb_params", "clip_l", "clip_g", "string_to_param.*", "string_to_token.*"}


def not_a_checkpoint(path: Path, keys) -> CheckpointError:
    """Say what a file without an ldm UNet is, as far as its keys tell."""
    keys = list(keys)
    n = len(keys)

    def any_(pred) -> bool:
        return any(pred(k) for k in keys)

    if any_(lambda k: any(m in k for m in _LORA_MARKERS)) or (
            any_(lambda k: k.endswith(".alpha")) and any_(lambda k: "lora" in k.lower())):
        what = ("it looks like a LoRA/LyCORIS file (keys such as 'lora_unet_…', '….lora_down.…'), not a full "
                "checkpoint. Train on the base checkpoint it was made for, or apply it to that model with a LoRA "
                "loader (e.g. ComfyUI's LoraLoader)")
    elif {k.split(".")[0] + (".*" if "." in k else "") for k in keys} <= _EMBEDDING_KEYS:
        what = "it looks like a textual-inversion embedding, not a checkpoint"
    elif any_(lambda k: "joint_blocks." in k):
        what = "it looks like a Stable Diffusion 3 / 3.5 (MMDiT) model, which is not supported"
    elif any_(lambda k: "double_blocks." in k or "single_blocks." in k):
        what = "it looks like a Flux model, which is not supported"
    elif any_(lambda k: k.startswith(UNET_PREFIX)):
        what = (f"its diffusion model ('{UNET_PREFIX}*') is not a Stable Diffusion UNet (it has no input_blocks): "
                f"a transformer-based or other architecture")
    elif any_(lambda k: k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE_PREFIX))) and \
            all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE_PREFIX)) for k in keys):
        what = "it looks like a VAE-only file; a full checkpoint (UNet + VAE + text encoder) is needed"
    elif any_(lambda k: k.startswith(("input_blocks.", "middle_block.", "output_blocks."))):
        what = ("it holds only a UNet (as in ComfyUI's models/diffusion_models or models/unet); a full checkpoint "
                "(UNet + VAE + text encoder, as in models/checkpoints) is needed")
    elif any_(lambda k: k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "transformer_blocks."))):
        what = ("it looks like a single diffusers-format component (e.g. diffusion_pytorch_model.safetensors) "
                "or a diffusion transformer; give the original single-file checkpoint, or load the whole "
                "diffusers folder (the one with model_index.json)")
    elif any_(lambda k: k.startswith(("text_model.", "cond_stage_model.", "conditioner.", "transformer.resblocks."))):
        what = "it looks like a text encoder only; a full checkpoint (UNet + VAE + text encoder) is needed"
    else:
        sample = ", ".join(sorted(keys)[:3])
        what = f"its {n} tensors ({sample}, …) are not a Stable Diffusion checkpoint layout this loader knows"
    return CheckpointError(f"{path}: not a supported checkpoint: {what}. {SUPPORTED}")
