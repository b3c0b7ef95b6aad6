"""The embedded default model: a tiny text-to-image model pretrained on the toy world.

It is a standard diffusers folder (`assets/toy_model`: UNet2DConditionModel, a small
AutoencoderKL, a CLIP text encoder with the real CLIP tokenizer), so diffusers' own pipelines
and the reference DreamBooth script load it as they would Stable Diffusion. It is reproduced
by `tools/pretrain_toy_model.py` from a seed.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODEL_DIR = ASSETS / "toy_model"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"
EMBEDDED_NAME = "embedded"
RESOLUTION = 32

UNET_CONFIG = dict(
    sample_size=RESOLUTION,
    in_channels=3,
    out_channels=3,
    # Cross-attention only at 8×8 (and the mid block): attention at 16×16 doubles the CPU cost.
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 96),
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=8,
    norm_num_groups=16,
)
# Pixel space in a standard AutoencoderKL: tools/pretrain_toy_model.py sets its weights so that
# encode and decode are the identity (to ~1e-4), so diffusers' pipelines and trainers load the
# model unchanged. Learned tiny VAEs either blurred the toy world's patterns or, being strongly
# non-linear per pixel, turned the blurry early predictions of sampling into rainbow speckle.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(8,),
    layers_per_block=1,
    norm_num_groups=1,
    sample_size=RESOLUTION,
    mid_block_add_attention=False,
)
TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    # A cosine schedule's alpha_bar at t=999 is ~2e-9: starting there blows the first sampler
    # step up, so samplers start at a leading-spaced timestep instead.
    timestep_spacing="leading",
    steps_offset=1,
    clip_sample=False,
)


def is_embedded(model: str | None) -> bool:
    return model in (None, "", EMBEDDED_NAME)


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer from the shipped files (SD1.x/SDXL pad with
    <|endoftext|>, SD2.x/OpenCLIP with '!')."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(CLIP_TOKENIZER_DIR / "vocab.json"), str(CLIP_TOKENIZER_DIR / "merges.txt"),
                         pad_token=pad_token, model_max_length=77)
