"""A seeded random "mini SD1.5" checkpoint + its .yaml, for the WebUI (test code, WebUI venv).

The layout is SD1.5's (ldm key names, CLIP-L text encoder, 2 res blocks per level: the WebUI's
LoRA key converter assumes SD's 3 input blocks per level), with a reduced UNet and VAE declared
in a `.yaml` beside the file, which is how the WebUI loads a checkpoint of another size. The
modules are built from that same yaml with the WebUI's own `ldm` classes, so the file has
exactly the keys the WebUI's model has (it loads with strict=False: `build` asserts no key is
missing or extra). The UNet attends at both of its levels and in the middle, so LoRA names of
down/mid/up attentions are all exercised.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zlib
from pathlib import Path

VERSION = "a1111-mini-sd15-v2"
NAME = "mini_sd15"
UNET = dict(model_channels=64, channel_mult=[1, 2], num_res_blocks=2, attention_resolutions=[1, 2], num_heads=4)
VAE = dict(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=1)
#: where text encoders live in the WebUI's SD1 (ldm) and SDXL (sgm) checkpoints
TEXT_ENCODERS = ("cond_stage_model.", "conditioner.embedders.")


def yaml_text(a1111: Path) -> str:
    """The WebUI's v1-inference.yaml with the reduced sizes."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(a1111 / "configs" / "v1-inference.yaml")
    for k, v in UNET.items():
        cfg.model.params.unet_config.params[k] = v
    for k, v in VAE.items():
        cfg.model.params.first_stage_config.params.ddconfig[k] = v
    return OmegaConf.to_yaml(cfg)


def _init(name: str, t, seed: int) -> None:
    """Deterministic values per tensor name: norms 1, biases 0, weights N(0, 1/fan_in). ldm zero-
    initialises output layers; random ones make every layer (and so every LoRA) matter. The text
    encoder's layer norms get a bias around 0.1: with a zero bias the mean of its output is ~1e-9, and
    the WebUI's default prompt emphasis ("Original") divides by that mean, which gives NaN or not
    depending on the CPU's summation order (issue 41)."""
    import torch

    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + seed) % (2**31))
    with torch.no_grad():
        if not t.is_floating_point() or t.ndim == 0:  # (OpenCLIP's logit_scale keeps its value)
            return
        if name.endswith("bias") and name.startswith(TEXT_ENCODERS) and ("layer_norm" in name or ".ln_" in name):
            t.copy_(0.1 + 0.05 * torch.randn(t.shape, generator=g))
        elif name.endswith("bias"):
            t.zero_()
        elif t.ndim == 1:
            t.fill_(1.0)
        elif "embedding" in name and t.ndim == 2:
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        else:
            t.copy_(torch.randn(t.shape, generator=g) / max(1, t[0].numel()) ** 0.5)


def _import_ldm(repositories: Path) -> None:
    sd = str(repositories / "stable-diffusion-stability-ai")
    if sd not in sys.path:
        sys.path.insert(0, sd)
    import pytorch_lightning.utilities.distributed as dist  # the WebUI shims this name the same way

    if not hasattr(dist, "rank_zero_only"):
        from pytorch_lightning.utilities.rank_zero import rank_zero_only

        dist.rank_zero_only = rank_zero_only


def build(a1111: Path, repositories: Path, clip_config: Path, seed: int = 0) -> dict:
    import json

    import torch
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    _import_ldm(repositories)
    from ldm.util import instantiate_from_config

    cfg = OmegaConf.create(yaml_text(a1111))
    params = cfg.model.params
    params.cond_stage_config = "__is_unconditional__"  # CLIP is built below, from its config
    model = instantiate_from_config(cfg.model)
    clip = CLIPTextModel(CLIPTextConfig(**json.loads(clip_config.read_text())))
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    sd.update({"cond_stage_model.transformer." + k: v for k, v in clip.state_dict().items()})
    out = {}
    for k, v in sd.items():
        v = v.detach().clone()
        if k.startswith(("model.", "first_stage_model.", "cond_stage_model.")) and "position_ids" not in k:
            _init(k, v, seed)
            if k == "first_stage_model.decoder.conv_out.weight":
                v.mul_(0.1)  # decoded images stay mostly inside [-1, 1]
        # weights in fp16 as released checkpoints; the schedule buffers stay fp32
        out[k] = v.to(torch.float16) if v.is_floating_point() and k.startswith(
            ("model.", "first_stage_model.", "cond_stage_model.")) else v
    return {k: v.contiguous() for k, v in out.items()}


def cache_dir() -> Path:
    root = os.environ.get("DREAMBOOTH_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "dreambooth-test-cache")
    digest = hashlib.sha256((VERSION + Path(__file__).read_text()).encode()).hexdigest()[:12]
    path = Path(root) / f"{VERSION}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_checkpoint(a1111: Path, repositories: Path, clip_config: Path) -> Path:
    """The checkpoint (with its .yaml beside it), written once into the cache folder."""
    from safetensors.torch import save_file

    path = cache_dir() / f"{NAME}.safetensors"
    if not path.is_file():
        tensors = build(a1111, repositories, clip_config)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file(tensors, str(tmp), metadata={"dreambooth_test": VERSION})
        os.replace(tmp, path)
    path.with_suffix(".yaml").write_text(yaml_text(a1111))
    return path


# -- SDXL ------------------------------------------------------------------------------------------
# A1111 builds SDXL from generative-models' sd_xl_base.yaml, whose sizes a `.yaml` beside the checkpoint
# may change like SD1's: the UNet reduced (3 levels of 32/64/64 channels, attention at the 2nd and 3rd
# as in SDXL, 2 blocks deep at the 3rd), the VAE as above, CLIP-L at its real size (A1111 reads its config
# from the hub cache) and the OpenCLIP encoder as open_clip's smallest text tower, `ViT-S-32-alt` (width 256,
# 10 layers) instead of `ViT-bigG-14` (1280, 32): the cross-attention context is 768 + 256 wide and the
# ADM vector CLIP-G's pooled 256 + 6 × 256 size embeddings.
SDXL_NAME = "mini_sdxl"
SDXL_OPENCLIP = "ViT-S-32-alt"
SDXL_UNET = dict(model_channels=32, channel_mult=[1, 2, 2], transformer_depth=[1, 1, 2], num_head_channels=16,
                 context_dim=768 + 256, adm_in_channels=256 + 6 * 256)


def sdxl_yaml_text(repositories: Path) -> str:
    """generative-models' sd_xl_base.yaml (the config A1111 picks for SDXL) with the reduced sizes."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(repositories / "generative-models" / "configs" / "inference" / "sd_xl_base.yaml")
    for k, v in SDXL_UNET.items():
        cfg.model.params.network_config.params[k] = v
    cfg.model.params.conditioner_config.params.emb_models[1].params.arch = SDXL_OPENCLIP
    for k, v in VAE.items():
        cfg.model.params.first_stage_config.params.ddconfig[k] = v
    return OmegaConf.to_yaml(cfg)


def build_sdxl(repositories: Path, clip_config: Path, seed: int = 0) -> dict:
    """The whole sgm DiffusionEngine from the reduced yaml (so the file has exactly the keys A1111's model
    has), its CLIP-L made from `clip_config` and its OpenCLIP without pretrained weights (nothing is read
    from the hub), then seeded like the SD1 checkpoint."""
    import json
    import types

    import torch
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    _import_ldm(repositories)
    gm = str(repositories / "generative-models")
    if gm not in sys.path:
        sys.path.insert(0, gm)
    import sgm.modules.encoders.modules as encoders
    from sgm.util import instantiate_from_config

    cfg = OmegaConf.create(sdxl_yaml_text(repositories))
    cfg.model.params.conditioner_config.params.emb_models[1].params.version = None
    config = CLIPTextConfig(**json.loads(clip_config.read_text()))
    saved = encoders.CLIPTextModel, encoders.CLIPTokenizer
    encoders.CLIPTextModel = types.SimpleNamespace(from_pretrained=lambda _version: CLIPTextModel(config))
    encoders.CLIPTokenizer = types.SimpleNamespace(from_pretrained=lambda _version: None)
    try:
        model = instantiate_from_config(cfg.model)
    finally:
        encoders.CLIPTextModel, encoders.CLIPTokenizer = saved
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if k.startswith(("model.", "first_stage_model.", "conditioner.")) and "position_ids" not in k:
            _init(k, v, seed)
            if k == "first_stage_model.decoder.conv_out.weight":
                v.mul_(0.1)
        out[k] = v.to(torch.float16) if v.is_floating_point() and not k.startswith("denoiser.") else v
    return {k: v.contiguous() for k, v in out.items()}


def ensure_sdxl_checkpoint(repositories: Path, clip_config: Path) -> Path:
    """The mini SDXL checkpoint (with its .yaml beside it), written once into the cache folder."""
    from safetensors.torch import save_file

    path = cache_dir() / f"{SDXL_NAME}.safetensors"
    if not path.is_file():
        tensors = build_sdxl(repositories, clip_config)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file(tensors, str(tmp), metadata={"dreambooth_test": VERSION})
        os.replace(tmp, path)
    path.with_suffix(".yaml").write_text(sdxl_yaml_text(repositories))
    return path
