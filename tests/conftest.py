"""Shared fixtures: tiny seeded diffusers models (built in code, nothing downloaded)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tiny_backend(seed: int = 0, prediction_type: str = "epsilon"):
    """A random SD-layout model (16 px images, 8×8 latents) with the real CLIP tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth_core.backends.diffusers_backend import DiffusersBackend
    from dreambooth_core.embedded.model import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16, mid_block_add_attention=False)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407,
                                      bos_token_id=49406, pad_token_id=49407))
    sched = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "prediction_type": prediction_type, "timestep_spacing": "leading",
             "steps_offset": 1, "clip_sample": False}
    return DiffusersBackend(unet=unet, vae=vae, text_encoders=[te], tokenizers=[clip_tokenizer()],
                            scheduler_config=sched, name=f"tiny-{seed}", fingerprint=f"tiny{seed}{prediction_type}",
                            native_resolution=16)


@pytest.fixture
def tiny_backend():
    return make_tiny_backend()


def diffusers_prediction(lora_path, x, t, prompt: str = "a photo of sks star"):
    """The denoiser's output through diffusers' own pipeline, with a saved LoRA loaded by its
    `load_lora_weights` on a fresh tiny model: what a diffusers user would get from our file."""
    pipe = make_tiny_backend().pipeline()
    pipe.load_lora_weights(str(lora_path))
    with torch.no_grad():
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        return pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample


def subject_share(images, subject, min_pixels: int = 1) -> float:
    """Mean fraction of an image's object pixels nearest to the subject's own two colours; an
    image with fewer than `min_pixels` object pixels counts as 0."""
    import numpy as np

    from dreambooth_core.embedded import toyworld

    colours = (subject.thing.colour, subject.thing.colour2)
    shares = []
    for im in images:
        mask = toyworld.object_mask(im)
        if mask.sum() < min_pixels:
            shares.append(0.0)
            continue
        names = [toyworld.nearest_colour(px, among=tuple(toyworld.PALETTE)) for px in im[mask].astype(np.float32)]
        shares.append(float(np.mean([n in colours for n in names])))
    return float(np.mean(shares))
