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
        if not t.is_floating_point():
            return
        if name.endswith("bias") and name.startswith("cond_stage_model.") and "layer_norm" in name:
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
