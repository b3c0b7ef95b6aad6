"""Tiny seeded checkpoints of the flow families whose text encoder is a large language model, in their
real key layout, for tests that may not download anything: Qwen-Image and HunyuanImage 2.1 (Qwen2.5-VL-7B
encoder) and AuraFlow (Pile-T5-XL).

Test code, beside family_checkpoints.py, whose helpers it uses: the host's own detection picks the layout,
and files are written once into the same cache folder.
Per family, as ComfyUI's loaders take it (the separate UNETLoader, CLIPLoader, VAELoader, or one checkpoint):
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
  auraflow    AuraFlow    one checkpoint, as AuraFlow is published (CheckpointLoaderSimple: `model.` MMDiT,
                          `text_encoders.pile_t5xl.transformer.`, `vae.`). One double + one single layer,
                          3072 wide with 12 heads (hard-coded; the host reads the layer counts, the
                          positional table, here 16x16 patches, and the text width, which
                          supported_models.AuraFlow requires to be 2048): ~510 M parameters. Pile-T5-XL
                          2048 wide (`pile_t5xl_model_config`), 2 blocks, d_ff 64: as a single file the
                          CLIPLoader would need `detect_te_model`'s 24 blocks (0.33: with d_ff 5120, 0.75 B
                          parameters), inside the checkpoint its class comes from the model config. The
                          SDXL VAE (4 channels, full size: both hosts hard-code it).
  hunyuan_image21  HunyuanImage21  one double + one single block (Flux-like), 128 wide with one head of 128:
                          the host reads the width, the text width, the patch and the block counts from the
                          tensors (no `vector_in`, no `byt5_in`, no `guidance_in`): 1.5 M parameters.
                          CLIPLoader type `hunyuan_image` (one file: no byT5): Qwen2.5-VL-7B's language
                          model 64 wide, 4 layers (the host takes hidden layer -3); the embedding is then
                          152064 x 64. VAE: HunyuanImage 2.1's 32x autoencoder (64 latent channels, widths
                          hard-coded by both hosts: 0.4 B parameters); a 64 px image is a 2x2 latent.
The text encoders' sizes come in through the host's own hook, `model_options["<name>_model_config"]`
(`qwen25_7b`, `pile_t5xl`: sd1_clip.SDClipModel reads it, in 0.3.64 as in 0.33; for a checkpoint,
load_checkpoint_guess_config's `te_model_options`); the tokenizers are the ones the host ships
(comfy/text_encoders/qwen25_tokenizer, t5_pile_tokenizer).

Not here, and why (each stays refused by name in nodes/families.py):
  - HiDream: both copies hard-code every size (16 double + 32 single MoE blocks of 2560: 17 B parameters)
    and four encoders up to Llama-3.1-8B;
  - Omnigen2: hard-coded 32 layers of 2520 (~4 B parameters);
  - Z-Image (0.33): 3840 wide (the width that selects it) with the 2+2 refiner layers the class always
    has, ~0.9 B parameters: over the CI budget of these tests;
  - Cosmos Predict2: not reached (its sampling is the host's own Cosmos rectified flow, not CONST).
"""
from __future__ import annotations

import json
from pathlib import Path

import family_checkpoints as fc

QWEN_TE = {"hidden_size": 3584, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 4}
# HunyuanImage 2.1 reads the text width from its tensors; it takes the encoder's hidden layer -3 (the host
# asserts 3 < the layer count)
QWEN_TE_SMALL = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 4}
# AuraFlow's DiT reads 2048-wide text (supported_models.AuraFlow matches cond_seq_dim 2048)
PILE_T5 = {"d_model": 2048, "d_ff": 64, "d_kv": 32, "num_heads": 2, "num_layers": 2}
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


def _aura_skeleton(max_seq=256):
    m = fc._meta
    return {"double_layers.0.attn.w1q.weight": m(3072, 3072), "single_layers.0.attn.w1q.weight": m(3072, 3072),
            "positional_encoding": m(1, max_seq, 3072), "cond_seq_linear.weight": m(3072, 2048)}


def sd_vae_layout() -> dict:
    """The 4-channel KL autoencoder of SD1/SDXL (`encoder.*`, `decoder.*`; both hosts hard-code its widths)."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    params = dict(fc.VAE_DDCONFIG, z_channels=4)
    with torch.device("meta"):
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": params},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": params})
    return fc._shapes(vae)


def _auraflow(name: str, seed: int) -> fc.FamilyFiles:
    """AuraFlow as it is published: one checkpoint (CheckpointLoaderSimple) with the MMDiT under `model.`,
    Pile-T5-XL under `text_encoders.pile_t5xl.transformer.` and the SDXL VAE under `vae.`."""
    import torch
    import comfy.ops
    import comfy.text_encoders.t5 as t5

    info, layout = fc._choose([(_aura_skeleton(), {"hidden": 3072, "double": 1, "single": 1, "t5": PILE_T5})],
                              "AuraFlow")
    cfg = json.loads((Path(t5.__file__).parent / "t5_pile_config_xl.json").read_text())
    cfg.update(PILE_T5)
    with torch.device("meta"):
        te = t5.T5(cfg, None, "meta", comfy.ops.disable_weight_init)
    full = {f"model.{k}": v for k, v in layout.items()}
    full.update({f"text_encoders.pile_t5xl.transformer.{k}": v for k, v in fc._shapes(te).items()})
    full.update({f"vae.{k}": v for k, v in sd_vae_layout().items()})
    ckpt = _write(name, full, seed, scale={"vae.decoder.conv_out.weight": 0.1})
    return fc.FamilyFiles(
        name=name, model_class="AuraFlow", diffusion_model=ckpt, text_encoders=(ckpt,), clip_type="checkpoint",
        vae=ckpt, latent_channels=4, te_model_options={"pile_t5xl_model_config": dict(PILE_T5)}, layout=info,
        expect={"n_double_layers": 1, "n_layers": 2, "cond_seq_dim": 2048})


def qwen25_7b_small_file(seed: int = fc.SEED) -> Path:
    """Qwen2.5-VL-7B's language model at QWEN_TE_SMALL (for a DiT that reads the text width)."""
    import torch
    import comfy.ops
    import comfy.text_encoders.llama as llama

    with torch.device("meta"):
        m = llama.Qwen25_7BVLI(dict(QWEN_TE_SMALL), None, "meta", comfy.ops.disable_weight_init)
    return _write("qwen25_7b", {k: v for k, v in fc._shapes(m).items() if not k.startswith("visual.")}, seed)


def hunyuan_image_vae_file(seed: int = fc.SEED) -> Path:
    """HunyuanImage 2.1's 32x autoencoder (64 latent channels; both hosts hard-code its widths, 0.4 B)."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"block_out_channels": [128, 256, 512, 512, 1024, 1024], "in_channels": 3, "out_channels": 3,
                "num_res_blocks": 2, "ffactor_spatial": 32, "downsample_match_channel": True,
                "upsample_match_channel": True, "z_channels": 64}
    with torch.device("meta"):
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.hunyuan_video.vae.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.hunyuan_video.vae.Decoder", "params": ddconfig})
    return _write("hunyuan_image_vae", fc._shapes(vae), seed, scale={"decoder.conv_out.weight": 0.1})


def _hunyuan_image_skeleton(hidden=128, ctx=64):
    m = fc._meta
    return {"img_in.proj.weight": m(hidden, 64, 1, 1), "final_layer.linear.weight": m(64, hidden),
            "txt_in.input_embedder.weight": m(hidden, ctx),
            "txt_in.individual_token_refiner.blocks.0.norm1.weight": m(hidden),
            "double_blocks.0.img_attn.qkv.weight": m(3 * hidden, hidden),
            "single_blocks.0.linear2.weight": m(hidden, 5 * hidden)}


def _hunyuan_image21(name: str, seed: int) -> fc.FamilyFiles:
    ctx = QWEN_TE_SMALL["hidden_size"]
    info, layout = fc._choose([(_hunyuan_image_skeleton(128, ctx), {"hidden": 128, "heads": 1, "te": QWEN_TE_SMALL})],
                              "HunyuanImage21")
    return fc.FamilyFiles(
        name=name, model_class="HunyuanImage21", diffusion_model=_write(name, layout, seed),
        text_encoders=(qwen25_7b_small_file(seed),), clip_type="hunyuan_image", vae=hunyuan_image_vae_file(seed),
        latent_channels=64, te_model_options={"qwen25_7b_model_config": dict(QWEN_TE_SMALL)}, layout=info,
        expect={"image_model": "hunyuan_video", "hidden_size": 128, "context_in_dim": ctx})


FAMILIES = {"qwen_image": lambda seed: _qwen_image("qwen_image", seed),
            "auraflow": lambda seed: _auraflow("auraflow", seed),
            "hunyuan_image21": lambda seed: _hunyuan_image21("hunyuan_image21", seed)}


def ensure_family(name: str, seed: int = fc.SEED) -> fc.FamilyFiles:
    """The family's files for the running host (written once); FamilyUnsupported where it detects none."""
    return FAMILIES[name](seed)


def load(files: fc.FamilyFiles):
    """(MODEL, CLIP, VAE) as a user's loaders give them: one checkpoint through CheckpointLoaderSimple's
    `load_checkpoint_guess_config` (its te_model_options carry the reduced text encoder's config), else
    the separate loaders."""
    if files.clip_type != "checkpoint":
        return files.load_model(), files.load_clip(), files.load_vae()
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(str(files.diffusion_model), te_model_options=files.clip_model_options())
    return out[0], out[1], out[2]
