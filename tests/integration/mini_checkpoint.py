"""A seeded random "mini SD1.5" checkpoint in the original (ldm) layout, built with ComfyUI's own
model classes, for the stock CheckpointLoaderSimple.

Test code: it imports comfy (run it under the host's Python). What the loader needs (see
shared/COMFYUI_NOTES.md §6): SD1.5 widths (model_channels 320, context_dim 768, 4-D conv proj_in),
here with channel_mult [1, 2] and one res block per level, plus the full SD VAE and CLIP-L shapes
(the loader keeps missing tensors uninitialised). ~300 M parameters, ~600 MB in fp16.

Every weight is drawn from a generator seeded per tensor name, so the file is identical on every
machine and run; `ensure_checkpoint` writes it once into a cache folder and reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path

VERSION = "mini-sd15-v2"
FILE_NAME = "mini_sd15.safetensors"

UNET_CONFIG = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1],
                   channel_mult=[1, 2], num_heads=8, num_head_channels=-1, transformer_depth=[1, 1],
                   transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=768,
                   use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
                   adm_in_channels=None)
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _init_(name: str, t, generator_seed: int) -> None:
    """Deterministic, well-scaled random values: norms at 1/0, biases 0, weights ~ N(0, 1/fan_in).
    The text encoder's layer norms get a bias around 0.1, so no quantity a host may divide by (the
    mean of the text encoder's output, ~1e-9 with zero biases) is near zero on any CPU."""
    import torch

    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + generator_seed) % (2**31))
    leaf = name.rsplit(".", 1)[-1]
    with torch.no_grad():
        if leaf == "bias" and name.startswith("clip.") and "layer_norm" in name:
            t.copy_(0.1 + 0.05 * torch.randn(t.shape, generator=g))
        elif leaf == "bias":
            t.zero_()
        elif t.ndim == 1:
            t.fill_(1.0)
        elif "embedding" in name and t.ndim == 2:
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        else:
            fan_in = max(1, t[0].numel())
            t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)


def build_state_dict(seed: int = 0):
    import torch
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    out = {}
    unet = UNetModel(**UNET_CONFIG, dtype=torch.float32, device="cpu", operations=ops)
    for k, v in unet.state_dict().items():
        _init_("unet." + k, v, seed)
        out["model.diffusion_model." + k] = v
    vae = AutoencodingEngine(regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                             encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder",
                                             "params": VAE_DDCONFIG},
                             decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder",
                                             "params": VAE_DDCONFIG})
    for k, v in vae.state_dict().items():
        _init_("vae." + k, v, seed)
        # The decoder's last conv is scaled down so decoded images stay inside [-1, 1] mostly.
        if k == "decoder.conv_out.weight":
            v.mul_(0.1)
        out["first_stage_model." + k] = v
    clip_cfg = json.loads((Path(comfy.ops.__file__).parent / "sd1_clip_config.json").read_text())
    clip = CLIPTextModel(clip_cfg, dtype=torch.float32, device="cpu", operations=ops)
    for k, v in clip.state_dict().items():
        if k.endswith("position_ids"):
            continue
        _init_("clip." + k, v, seed)
        out["cond_stage_model.transformer." + k] = v
    return {k: v.to(torch.float16).contiguous() for k, v in out.items()}


def cache_dir() -> Path:
    root = os.environ.get("DREAMBOOTH_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "dreambooth-test-cache")
    digest = hashlib.sha256((VERSION + Path(__file__).read_text()).encode()).hexdigest()[:12]
    path = Path(root) / f"{VERSION}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_checkpoint(seed: int = 0) -> Path:
    """The checkpoint file, written once (atomically) into the cache folder."""
    from safetensors.torch import save_file

    path = cache_dir() / FILE_NAME
    if path.is_file():
        return path
    sd = build_state_dict(seed)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(sd, str(tmp), metadata={"dreambooth_test": VERSION})
    os.replace(tmp, path)
    return path
