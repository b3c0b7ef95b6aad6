"""Seeded random "mini SD1.5" checkpoints that Forge detects and loads (test code, Forge's venv).

Forge has no `.yaml` route: it guesses the family from the keys (`repositories/huggingface_guess`),
which wants SD1.5's widths (model_channels 320, context 768), and builds the VAE and CLIP-L from the
configs in its own `backend/huggingface/runwayml/...` folders. So the UNet is reduced (two levels of
320 channels, attention at both and in the middle, 2 res blocks per level) and the VAE and text
encoder have their real sizes. Every module is built with Forge's own classes (`backend.nn.unet`,
`backend.nn.vae`) and transformers' CLIP, so the file has exactly the keys Forge's model has; the
builder checks that huggingface_guess detects the intended family. Values are those of the A1111
fixture's `_init` (tests/a1111/a1111_checkpoint.py): norms 1, random weights, text-encoder layer-norm
biases away from zero (the default "Original" emphasis divides by the mean of the encoder's output).

Run as a script (a fresh process, Forge's folder on sys.path): `python forge_checkpoint.py FORGE OUT
[--inpaint]`; `ensure_checkpoint` does that once per version into the test cache.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "forge-mini-sd15-v1"
HERE = Path(__file__).resolve().parent
UNET = dict(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2], channel_mult=[1, 1],
            transformer_depth=[1, 1, 1, 1], transformer_depth_output=[1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
            use_spatial_transformer=True, use_linear_in_transformer=False, context_dim=768, num_heads=8,
            num_head_channels=-1, use_checkpoint=False, adm_in_channels=None)
SD15 = "backend/huggingface/runwayml/stable-diffusion-v1-5"


def build(forge: Path, inpaint: bool = False, seed: int = 0) -> dict:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path[:0] = [str(forge), str(forge / "packages_3rdparty"), str(forge / "repositories" / "huggingface_guess")]
    sys.argv = [sys.argv[0], "--always-cpu", "--all-in-fp32"]  # what backend.args reads at import
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL

    sys.path.insert(0, str(HERE.parent / "a1111"))
    from a1111_checkpoint import _init

    torch.manual_seed(seed)
    unet = IntegratedUNet2DConditionModel(**dict(UNET, in_channels=9 if inpaint else 4))
    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(str(forge / SD15 / "vae")))
    clip = CLIPTextModel(CLIPTextConfig.from_pretrained(str(forge / SD15 / "text_encoder")))
    sd = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.transformer.", clip)):
        for k, v in module.state_dict().items():
            if k.endswith("position_ids"):
                continue
            v = v.detach().clone().float()
            _init(prefix + k, v, seed)
            if prefix + k == "first_stage_model.decoder.conv_out.weight":
                v.mul_(0.1)  # decoded images stay mostly inside [-1, 1]
            sd[prefix + k] = v.to(torch.float16).contiguous()  # fp16, as released checkpoints
    _check_detection(sd, inpaint)
    return sd


def _check_detection(sd: dict, inpaint: bool) -> None:
    """huggingface_guess (what Forge's loader asks) must see SD1.5 (inpainting) with this UNet."""
    import huggingface_guess

    guess = huggingface_guess.guess(sd)
    name = type(guess).__name__
    assert name == "SD15", f"huggingface_guess detects {name}, not SD15"
    assert guess.inpaint_model() == inpaint, "inpainting detection"
    for key in ("model_channels", "context_dim", "num_res_blocks", "channel_mult"):
        assert list(guess.unet_config[key]) == UNET[key] if isinstance(UNET[key], list) else \
            guess.unet_config[key] == UNET[key], (key, guess.unet_config[key])


def cache_dir() -> Path:
    root = os.environ.get("DREAMBOOTH_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "dreambooth-test-cache")
    text = VERSION + Path(__file__).read_text() + (HERE.parent / "a1111" / "a1111_checkpoint.py").read_text()
    path = Path(root) / f"{VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_checkpoint(forge: Path, inpaint: bool = False) -> Path:
    """The checkpoint, written once into the cache folder (by a fresh process: Forge's `backend` parses
    the command line and sets up its devices at import)."""
    path = cache_dir() / ("mini_sd15_inpainting.safetensors" if inpaint else "mini_sd15.safetensors")
    if not path.is_file():
        cmd = [sys.executable, __file__, str(forge), str(path)] + (["--inpaint"] if inpaint else [])
        out = subprocess.run(cmd, cwd=str(forge), capture_output=True, text=True, timeout=900,
                             env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        if out.returncode != 0 or not path.is_file():
            raise RuntimeError(f"building {path.name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return path


def main(argv) -> None:
    from safetensors.torch import save_file

    forge, out = Path(argv[1]), Path(argv[2])
    tensors = build(forge, inpaint="--inpaint" in argv)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    save_file(tensors, str(tmp), metadata={"dreambooth_test": VERSION})
    os.replace(tmp, out)


if __name__ == "__main__":
    main(list(sys.argv))
