"""SDXL on Forge's own StableDiffusionXL engine, in one process (test code, Forge's venv; run by
test_forge_sdxl.py in a writable copy of Forge).

Forge builds SDXL's text encoders from its full-size configs (CLIP-G alone is 695M parameters), so a
checkpoint through its loader would not be small. Here the engine is Forge's own class, built from
components made the way `backend/loader.py` makes them (Forge's operations swapped into torch.nn, the
weights loaded under inference mode, so they are inference tensors; Forge's SDXL scheduler and
tokenizers), only smaller: two CLIPs (32 and 64 wide), a 3-level UNet with SDXL's layout (no attention
at the first level, ADM `y` from CLIP-G's pooled output and the size embeddings), a small VAE. Then the
extension's ForgeBackend trains a LoRA with prior preservation and the text encoders on it through the
core trainer (with gradient checkpointing, Forge having no switch of its own), and Forge's own LoRA code (`model_lora_keys_unet` / `_clip`, `load_lora`, the patchers'
`add_patches` + `refresh_loras`) must take every key and change the prediction. Prints `RESULT {json}`.
"""
from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SDXL_REPO = "backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0"


def _seeded(sd: dict) -> dict:
    import torch

    out = {}
    for k, v in sd.items():
        v = v.detach().clone().float()
        g = torch.Generator().manual_seed(zlib.crc32(k.encode()) % (2 ** 31))
        if k.endswith("position_ids") or v.ndim == 0:
            out[k] = sd[k]
            continue
        if "norm" in k and k.endswith("bias"):
            v.copy_(0.1 + 0.05 * torch.randn(v.shape, generator=g))
        elif k.endswith("bias"):
            v.zero_()
        elif v.ndim == 1:
            v.fill_(1.0)
        else:
            v.copy_(torch.randn(v.shape, generator=g) / max(1, v[0].numel()) ** 0.5)
        out[k] = v
    return out


def _forge_module(make, **ops):
    """`make()` built with Forge's operations (as its loader does), loaded with seeded weights under
    inference mode (so they are inference tensors, as in Forge)."""
    import torch
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    sd = _seeded(make().state_dict())
    with using_forge_operations(device=torch.device("cpu"), dtype=torch.float32, **ops):
        module = make()
    with torch.inference_mode():
        load_state_dict(module, sd)
    return module


def build_engine(forge: Path):
    import torch
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers import modeling_utils

    from backend.diffusion_engine.sdxl import StableDiffusionXL
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from huggingface_guess import model_list

    def clip(width, act, bos, eos, pad):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                             num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=width,
                             bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
        with modeling_utils.no_init_weights():
            return _forge_module(lambda: IntegratedCLIP(CLIPTextModel, cfg, add_text_projection=True),
                                 manual_cast_enabled=True)

    unet_config = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[2, 2, 2],
                       channel_mult=[1, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=2,
                       transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], use_spatial_transformer=True,
                       use_linear_in_transformer=True, context_dim=32 + 64, num_classes="sequential",
                       adm_in_channels=64 + 6 * 256, num_heads=-1, num_head_channels=16, use_checkpoint=False)
    unet = _forge_module(lambda: IntegratedUNet2DConditionModel(**unet_config), manual_cast_enabled=False)
    cpu = torch.device("cpu")
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.initial_device = unet.offload_device = cpu
    vae = _forge_module(lambda: IntegratedAutoencoderKL(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, scaling_factor=0.13025))
    components = {
        "text_encoder": clip(32, "quick_gelu", 49406, 49407, 1), "text_encoder_2": clip(64, "gelu", 0, 2, 1),
        "tokenizer": CLIPTokenizer.from_pretrained(str(forge / SDXL_REPO / "tokenizer")),
        "tokenizer_2": CLIPTokenizer.from_pretrained(str(forge / SDXL_REPO / "tokenizer_2")),
        "vae": vae, "unet": unet,
        "scheduler": EulerDiscreteScheduler.from_pretrained(str(forge / SDXL_REPO / "scheduler")),
    }
    guess = model_list.SDXL({"model_channels": 32, "adm_in_channels": 64 + 6 * 256, "in_channels": 4})
    return StableDiffusionXL(estimated_config=guess, huggingface_components=components)


def main(forge: Path, out_dir: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    sys.path[:0] = [str(REPO), str(REPO / "scripts")]
    from dreambooth_a1111.forge_backend import ForgeBackend
    from dreambooth_a1111.loaded import is_forge_engine
    from dreambooth_core.config import TrainConfig
    from dreambooth_core.training.trainer import train

    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

    torch.manual_seed(0)
    engine = build_engine(forge)
    assert is_forge_engine(engine)
    backend = ForgeBackend(engine, train_text_encoder=True)
    fo = engine.forge_objects
    probe = (torch.randn(1, 4, 8, 8), torch.tensor([500]))

    def prediction():
        with torch.no_grad():
            return backend.predict(*probe, backend.encode_text(["a photo of sks ball"], size=(64, 64)))

    before = prediction()

    class Item:
        def __init__(self, image, caption):
            self.image, self.caption = image, caption

    def disc(bg, colour):
        im = Image.new("RGB", (64, 64), bg)
        ImageDraw.Draw(im).ellipse((12, 14, 50, 52), fill=colour)
        return im

    instance = [Item(disc(bg, (200, 30, 30)), "a photo of sks ball") for bg in ((30, 90, 200), (40, 160, 60))]
    classes = [Item(disc(bg, (90, 90, 90)), "a photo of ball") for bg in ((200, 200, 200), (20, 20, 20))]
    config = TrainConfig.from_mapping(dict(token="sks", class_noun="ball", steps=2, resolution=64, rank=4,
                                           learning_rate=5e-3, train_text_encoder=True, prior=True,
                                           output_dir=str(out_dir / "run"), save_name="dbxl", sample_every=0,
                                           gradient_checkpointing="full"),  # the UNet's blocks recomputed
                                      source="test")
    result = train(backend, config, instance, classes)
    history = result.history
    lora_sd = result.network.state_dict()  # the file's tensors, by key
    backend.release()
    after_release = prediction()

    unet_keys = model_lora_keys_unet(fo.unet.model, {})
    clip_keys = model_lora_keys_clip(fo.clip.cond_stage_model, {})
    patches_unet, rest = load_lora(dict(lora_sd), unet_keys)
    patches_clip, rest = load_lora(rest, clip_keys)
    unet = fo.unet.clone()
    loaded = unet.add_patches(filename="dbxl", patches=patches_unet)
    clip = fo.clip.clone()
    loaded_clip = clip.add_patches(filename="dbxl", patches=patches_clip)
    unet.refresh_loras()
    clip.patcher.refresh_loras()
    with torch.no_grad():
        cond = backend.encode_text(["a photo of sks ball"], size=(64, 64))
        with_lora = backend.predict(*probe, cond)
    fo.unet.refresh_loras()
    fo.clip.patcher.refresh_loras()
    untrained = [k for k, v in lora_sd.items() if k.endswith("lora_up.weight") and not v.abs().max() > 0]
    return {"family": backend.family, "native_resolution": backend.native_resolution,
            "steps": [h["step"] for h in history], "prior": [h["prior_loss"] for h in history],
            "losses_finite": bool(all(np.isfinite(h["loss"]) for h in history)),
            "modules": len({k.split(".")[0] for k in lora_sd}),
            "prefixes": sorted({k.split("_")[0] + "_" + k.split("_")[1] for k in lora_sd}),
            "unmatched": sorted(rest), "unet_patched": len(loaded), "clip_patched": len(loaded_clip),
            "unet_patches": len(patches_unet), "clip_patches": len(patches_clip),
            "untrained": untrained[:3], "n_untrained": len(untrained),
            "restored": bool(torch.equal(before, after_release)),
            "lora_change": float((with_lora - before).abs().mean())}


if __name__ == "__main__":
    forge = Path(sys.argv[1]).resolve()
    sys.path[:0] = [str(forge), str(forge / "packages_3rdparty"), str(forge / "repositories" / "huggingface_guess")]
    out = Path(sys.argv[2])
    sys.argv = [sys.argv[0], "--always-cpu", "--all-in-fp32"]  # what Forge's argument parsers read
    os.chdir(forge)
    from modules import shared_init

    shared_init.initialize()  # shared.opts: SDXL's conditioning reads its crop settings
    print("RESULT " + json.dumps(main(forge, out)))
