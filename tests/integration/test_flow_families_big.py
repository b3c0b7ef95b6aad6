"""The comfy backend on the flow families whose sizes the host hard-codes in its detection: Z-Image
(ComfyUI 0.33 only), HiDream and Omnigen2, in-process on the host's own objects, with tiny checkpoints in each
family's real layout that the host builds small under a test-only wrapper of its detection
(family_checkpoints_big.py: the scaffolding, documented there).

Checked per family, as test_flow_families_more.py checks Qwen-Image, AuraFlow and HunyuanImage 2.1:
  - the backend's velocity is the host's own (its encoding, `extra_conds`, `apply_model`);
  - a few LoRA steps of the core trainer with prior preservation (class images from `generate`) lower
    the held-out flow loss of the identifier prompt; the file carries `lora_unet_` keys of the blocks'
    attention and MLP Linears (HiDream's MoE experts too; no modulation, no text projection, nothing of
    Omnigen2's reference-image refiner) and the family's metadata; the stock LoraLoader uses every key and
    changes the model's output as the trained MODEL does; the base MODEL stays bit-identical; the identifier
    is checked in the tokenizers that read the prompt (HiDream's CLIP-L and CLIP-G, the others' Qwen);
    HiDream's Llama hidden states reach the model as the host's conditioning carries them;
  - a class image equals the stock KSampler graph's image with that seed.
HiDream's T5 must be 24 blocks with 10240-wide (0.33) or 4096-wide (0.3.64) feed-forwards for the host to
take it for T5-XXL, and pads every prompt to 128 tokens (~0.7 s a prompt here, a dozen prompts a run): as
AuraFlow's in test_flow_families_more.py, its padding is left off through the host's own tokenizer option
(`t5xxl_min_length` 1). Its Llama keeps the host's 128 tokens (cheap), which make its hidden states one shape.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import family_checkpoints_big as fb  # noqa: E402
from family_checks import (PROMPT, Family, FamilySuite, assert_class_image_is_stock, check_flow_predict,  # noqa: E402
                           check_lora_training, comfy_backend, core)

# The fixtures are 64 (Z-Image 256) wide with a block or two: each step moves the held-out loss little. The
# identifier is checked in the tokenizers that read the prompt: HiDream's CLIP-L and CLIP-G (where it has CLIP,
# as Flux and SD3), Z-Image's and Omnigen2's Qwen tokenizer, which splits the usual identifiers. Z-Image and
# HiDream train with gradient checkpointing on (the blocks recomputed), Omnigen2 off.
SUITE = FamilySuite({
    "zimage": Family("z-image", "lora_unet_layers_0_attention_qkv", "z_image", "z-image/lora", shift=3.0,
                     tokenizers=("Qwen2Tokenizer",), steps=3, lr=3e-2, checkpointing=True),
    "hidream": Family("hidream", "lora_unet_double_stream_blocks_0_block_attn1_to_q", "hidream", "hidream/lora",
                      shift=1.0, tokenizers=("CLIPTokenizer", "CLIPTokenizer"), splits=False, checkpointing=True,
                      clip_options=(("t5xxl_min_length", 1),)),
    "omnigen2": Family("omnigen2", "lora_unet_layers_0_attn_to_q", "omnigen2", "omnigen2/lora", shift=2.6,
                       tokenizers=("Qwen2Tokenizer",), steps=6, lr=3e-2),
}, ensure=fb.ensure_family, load=fb.load)
name = SUITE.fixture()


def test_predict_is_the_hosts_velocity(comfy_host, pack, name):
    files, model, clip, vae = check_flow_predict(pack, SUITE, name)
    if name == "hidream":
        # the Llama hidden states are one shape per prompt only as the host pads them (to 128 tokens): a CLIP
        # whose padding a node turned off is refused, naming them, rather than trained on mismatched batches
        unpadded = clip.clone()
        unpadded.set_tokenizer_option("llama_min_length", 1)
        with pytest.raises(core(pack, "backends.base").UnsupportedModel, match="conditioning_llama3"), torch.no_grad():
            comfy_backend(pack).ComfyBackend(model, unpadded, vae).encode_text([PROMPT, "a dog"], size=(64, 64))


def test_lora_training_lowers_flow_loss_and_loads_in_the_stock_loader(comfy_host, pack, name, tmp_path, caplog):
    check_lora_training(comfy_host, pack, SUITE, name, tmp_path, caplog,
                        excluded=r"mod|embed|final|norm|ref_image|caption_projection")


def test_class_images_are_the_stock_ksampler_images(comfy_host, pack, name):
    """A class image is the PNG of a stock graph with that seed: CLIPTextEncode, an empty 16-channel latent,
    KSampler, VAEDecode."""
    files, model, clip, vae = SUITE.load(name)
    assert_class_image_is_stock(pack, model, clip, vae)
