"""The comfy backend on the flow families that train through the generic rule (families.py: the blocks
are the transformer's block lists, the LoRA their Linears but the modulation): Qwen-Image, AuraFlow and
HunyuanImage 2.1, in-process on the host's own objects, with tiny checkpoints in each family's real
layout (family_checkpoints_llm.py).

Checked per family, as test_flow_families.py checks the others:
  - the backend's velocity is the host's own (its encoding, `extra_conds`, `apply_model`);
  - a few LoRA steps of the core trainer with prior preservation (class images from `generate`) lower
    the held-out flow loss of the identifier prompt; the file carries `lora_unet_` keys of the blocks'
    attention and MLP Linears (no modulation) and the family's metadata; the stock LoraLoader uses every
    key and changes the model's output as the trained MODEL does; the base MODEL stays bit-identical;
  - a class image equals the stock KSampler graph's image with that seed;
  - the families still refused are refused up front, named.
The hosts hard-code both transformers' width (3072): Qwen-Image's smallest model is ~380 M parameters
(one block) plus a 545 M-parameter text-encoder embedding, AuraFlow's ~510 M (one double + one single
layer), so each trains 2 steps (~5 s a step on one CPU thread) and only Qwen-Image with gradient
checkpointing on. AuraFlow's Pile-T5 pads every prompt to 256 tokens; here it is left unpadded through
the host's own tokenizer option (`pile_t5xl_min_length` 1), so a step costs seconds, not a minute.
HunyuanImage 2.1's transformer is 128 wide (the host reads its width) beside its 0.4 B-parameter VAE.
The whole file, fixtures built on a cold cache, took 76 s (0.3.64) and 84 s (0.33) on 2 cores shared with
other jobs (load ~2.5; at load 5-7, 140 s); with the cache warm, 60-75 s.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import family_checkpoints_llm as fl  # noqa: E402
from family_checks import (Family, FamilySuite, assert_class_image_is_stock, assert_detection_refuses,  # noqa: E402
                           check_flow_predict, check_lora_training)

SUITE = FamilySuite({
    "auraflow": Family("auraflow", "lora_unet_single_layers_0_mlp_c_proj", "auraflow", "auraflow/lora", shift=1.73,
                       tokenizers=("_SentencePieceView",), clip_options=(("pile_t5xl_min_length", 1),)),
    # 128 wide (the host reads its width), its 32x latents 2x2 at 64 px: cheap steps, each moving the held-out
    # loss little
    "hunyuan_image21": Family("hunyuan-image", "lora_unet_double_blocks_0_img_attn_qkv", "hunyuan_image_2.1",
                              "hunyuan-image-2.1/lora", shift=5.0, tokenizers=("Qwen2Tokenizer",), steps=6, lr=1e-2),
    # trained with gradient checkpointing on (the blocks recomputed); AuraFlow off
    "qwen_image": Family("qwen-image", "lora_unet_transformer_blocks_0_attn_to_q", "qwen_image", "Qwen-Image/lora",
                         shift=1.15, tokenizers=("Qwen2Tokenizer",), checkpointing=True),
}, ensure=fl.ensure_family, load=fl.load)
name = SUITE.fixture()


def test_predict_is_the_hosts_velocity(comfy_host, pack, name):
    check_flow_predict(pack, SUITE, name)


def test_lora_training_lowers_flow_loss_and_loads_in_the_stock_loader(comfy_host, pack, name, tmp_path, caplog):
    """The identifier is checked in the tokenizer that reads the prompt (not HunyuanImage's byte-level ByT5),
    which splits the usual identifiers."""
    check_lora_training(comfy_host, pack, SUITE, name, tmp_path, caplog, excluded=r"mod|embed|final|norm")


def test_class_images_are_the_stock_ksampler_images(comfy_host, pack):
    """Qwen-Image's class image is the PNG of a stock graph with that seed: CLIPTextEncode, an empty
    16-channel latent (EmptySD3LatentImage's), KSampler (one frame for the Wan latent format), VAEDecode."""
    files, model, clip, vae = SUITE.load("qwen_image")
    assert_class_image_is_stock(pack, model, clip, vae)


# supported_models class -> the model_base class its get_model builds (whose default ModelType decides sampling)
REFUSED = {"CosmosI2VPredict2": "CosmosPredict2"}


@pytest.mark.parametrize("cls", sorted(REFUSED))
def test_families_that_do_not_train_are_refused_by_name(comfy_host, pack, cls):
    """Each text-to-image family of the host that does not train here is refused before any work, by its
    class name and its sampling, with what trains."""
    import inspect

    import comfy.model_base
    import comfy.supported_models

    config_cls = getattr(comfy.supported_models, cls, None)
    if config_cls is None:
        pytest.skip(f"this host has no {cls}")
    config = config_cls(dict(config_cls.unet_config, hidden_size=6144))  # a width for configs that read one
    model_type = inspect.signature(getattr(comfy.model_base, REFUSED[cls]).__init__).parameters["model_type"].default
    sampling = comfy.model_base.model_sampling(config, model_type)
    assert_detection_refuses(pack, config, sampling, rf"the connected MODEL is {cls} \(\w+ sampling\); DreamBooth "
                                                     r"trains SD1\.x, .*Qwen-Image, AuraFlow, HunyuanImage 2\.1, "
                                                     r"HiDream, Omnigen2")
