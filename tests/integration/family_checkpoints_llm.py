"""Tiny seeded checkpoints of the flow families whose text encoder is a large language model, in their
real key layout, for tests that may not download anything: Qwen-Image (Qwen2.5-VL-7B encoder).

Test code, beside family_checkpoints.py, whose helpers it uses: the host's own detection picks the layout,
and files are written once into the same cache folder.
Per family, as ComfyUI's separate loaders take it (UNETLoader, CLIPLoader, VAELoader):
  qwen_image  QwenImage   one `transformer_blocks` block. Both host copies hard-code the inner width
                          (24 heads of 128: 3072) and the text width (3584, `txt_norm`); they read only
                          `img_in`'s input width and the block count, so this is ~380 M parameters.
                          CLIPLoader type `qwen_image`: Qwen2.5-VL-7B's language model 3584 wide (the DiT
                          reads 3584-wide features), 1 layer, 4 query heads and the 4 key/value heads
                          `detect_te_model` tells Qwen2.5-7B by (k_proj 512 rows); intermediate 64. Its
                          152064-row embedding stays (the template's ids reach 151644: 545 M parameters,
                          most of the file). The vision tower, which text-to-image never runs (32 layers
                          of 1280, 0.6 B parameters), is left out of the file: the loader names its keys
                          missing and leaves them unset.
                          VAE: the Wan 2.1 autoencoder (`decoder.middle.0.residual.0.gamma`), 96 wide:
                          0.3.64 hard-codes that width (0.33 reads it; the file is shared). Latents are
                          [B, 16, 1, H/8, W/8] (one frame).
The text encoder's size comes in through the host's own hook, `model_options["qwen25_7b_model_config"]`
(sd1_clip.SDClipModel reads `<name>_model_config`, in 0.3.64 as in 0.33); the tokenizer is the one the
host ships (comfy/text_encoders/qwen25_tokenizer).

Not here, and why (each stays refused by name in nodes/families.py):
  - HiDream: both copies hard-code every size (16 double + 32 single MoE blocks of 2560: 17 B parameters)
    and four encoders up to Llama-3.1-8B;
  - Omnigen2: hard-coded 32 layers of 2520 (~4 B parameters);
  - others (AuraFlow, Z-Image, HunyuanImage 2.1, Cosmos Predict2) were not reached in this change.
"""
from __future__ import annotations

from pathlib import Path

import family_checkpoints as fc

QWEN_TE = {"hidden_size": 3584, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 4}
WAN_VAE = {"dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
           "temperal_downsample": [False, True, True], "dropout": 0.0}
_write = fc._write  # files keyed by their layout, seed and scaling, in family_checkpoints' cache folder

def qwen25_7b_file(seed: int = fc.SEED) -> Path:
    """Qwen2.5-VL-7B's language model (`model.embed_tokens`, `model.layers.N.*`, `model.norm`) at QWEN_TE."""
    import torch
    import comfy.ops
    import comfy.text_encoders.llama as llama

    with torch.device("meta"):
        m = llama.Qwen25_7BVLI(dict(QWEN_TE), None, "meta", comfy.ops.disable_weight_init)
    layout = {k: v for k, v in fc._shapes(m).items() if not k.startswith("visual.")}
    return _write("qwen25_7b", layout, seed)


def wan21_vae_file(seed: int = fc.SEED) -> Path:
    """The Wan 2.1 autoencoder (16 latent channels, 8x spatial), in wan_2.1_vae.safetensors' layout."""
    import torch
    from comfy.ldm.wan.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(**WAN_VAE)
    # the decoder's last conv scaled down so decoded images stay mostly inside [-1, 1]
    return _write("wan21_vae", fc._shapes(vae), seed, scale={"decoder.head.2.weight": 0.1})


def _qwen_skeleton(in_channels=64):
    m = fc._meta
    return {"txt_norm.weight": m(3584), "img_in.weight": m(3072, in_channels),
            "transformer_blocks.0.attn.to_q.weight": m(3072, 3072)}


def _qwen_image(name: str, seed: int) -> fc.FamilyFiles:
    info, layout = fc._choose([(_qwen_skeleton(), {"hidden": 3072, "blocks": 1, "te": QWEN_TE})], "QwenImage")
    return fc.FamilyFiles(
        name=name, model_class="QwenImage", diffusion_model=_write(name, layout, seed),
        text_encoders=(qwen25_7b_file(seed),), clip_type="qwen_image", vae=wan21_vae_file(seed),
        te_model_options={"qwen25_7b_model_config": dict(QWEN_TE)}, layout=info,
        expect={"image_model": "qwen_image", "num_layers": 1})


FAMILIES = {"qwen_image": lambda seed: _qwen_image("qwen_image", seed)}


def ensure_family(name: str, seed: int = fc.SEED) -> fc.FamilyFiles:
    """The family's files for the running host (written once); FamilyUnsupported where it detects none."""
    return FAMILIES[name](seed)
