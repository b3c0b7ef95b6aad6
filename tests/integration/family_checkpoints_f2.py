"""Tiny seeded checkpoints of Flux 2 (dev, with its Mistral-Small-3 text encoder) and Cosmos Predict2
text-to-image, in their real key layout, for tests that may not download anything.

Test code, beside family_checkpoints.py, whose helpers it uses: the host's own detection picks the layout,
and files are written once into the same cache folder.
  flux2   Flux2   (0.33 only; 0.3.64 has no Flux 2) one double + one single block, 3 M parameters. The host
                  reads the width (`img_in`, 128: one head of 128), the text width (`txt_in`) and the block
                  counts from the tensors; `double_stream_modulation_img` selects Flux 2, `guidance_in` is there as in
                  FLUX.2-dev. RMSNorm scales keep BFL's `*_norm.scale` names (the host renames them).
                  CLIPLoader type `flux2`: Mistral-Small-3's language model as FLUX.2-dev ships it pruned
                  (`detect_te_model`: 5120 wide, no layer 39, so the host builds 30 layers and taps
                  layers 10, 20 and the output: 15360-wide text), 1 query + 1 key/value head of 128,
                  intermediate 16, a 1557-row embedding (`mistral3_24b_model_config`): 94 M parameters.
                  Its tokenizer is the `tekken_model` tensor of the same file (the host reads Mistral's
                  tekken JSON from there and ships none): a tekken file written here (tekken_json) with
                  Mistral's special tokens at their ranks (<s> 1, [INST] 3, <pad> 11, [SYSTEM_PROMPT] 17),
                  the 256 bytes, the words of the host's Flux 2 template and of the tests' prompts, and a
                  few rare 4-letter words at the end of the vocabulary, where identifiers are suggested from.
                  VAE: FLUX.2's autoencoder (32 channels, batch-normed 2x2 patches: 128-channel latents at
                  16x), the SD layout whose encoder width the host hard-codes (84 M parameters).
  cosmos_predict2  CosmosT2IPredict2  (both hosts) MiniTrainDIT with one block, 128 wide, two heads of 64
                  (0.8 M parameters).
                  CLIPLoader type `cosmos`: T5-XXL v1.0 (`DenseReluDense.wi`, which `detect_te_model` takes for
                  Cosmos's encoder whatever its width when it has 24 blocks) 64 wide (`t5xxl_model_config`).
                  VAE: the Wan 2.1 autoencoder of family_checkpoints_llm (the same cached file); latents are
                  [B, 16, 1, H/8, W/8].
                  Scaffolding (test code, not the pack): both hosts hard-code the transformer's head count and
                  text width (16 heads, 1024-wide text, for the 2048-wide 2B model; 0.3.64 also 28 blocks) and
                  read only its width; `cosmos_detection()` wraps `comfy.model_detection.detect_unet_config`
                  while the test loads this file, so that for a width the host does not know it reads the head
                  count (`q_norm`'s width is the head size), the block count and the text width (`cross_attn.
                  k_proj`) from the tensors as it reads the width. Real checkpoints (2048 or 5120 wide) are
                  left to the host's own values.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Tuple

import family_checkpoints as fc
import family_checkpoints_llm as fl
from detection_scaffold import detect_unet_config_adjusted

_write = fc._write

# FLUX.2-dev's pruned Mistral-Small-3 (30 layers: the host taps layers 10, 20 and the last output)
MISTRAL_TE = {"hidden_size": 5120, "intermediate_size": 16, "num_hidden_layers": 30, "num_attention_heads": 1,
              "num_key_value_heads": 1, "final_norm": False}
# Mistral's special tokens at their tekken ranks (the host's Flux2Tokenizer uses <s> 1, <pad> 11 and the
# template's [SYSTEM_PROMPT] / [INST] pairs); the other ranks below the offset are filler, as in tekken
_SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 11: "<pad>", 17: "[SYSTEM_PROMPT]",
            18: "[/SYSTEM_PROMPT]"}
_SPECIAL_COUNT = 1000
# the words of comfy.text_encoders.flux.Flux2Tokenizer's template and of the tests' prompts ("sks" is not one:
# it splits, as in Mistral's own vocabulary), then rare words, the last entries (the identifier suggestions)
_WORDS = ("You are an AI that reasons about image descriptions give structured responses focusing on object "
          "relationships attribution and actions without speculation a photo of dog cat person").split()
_WORDS = tuple(dict.fromkeys(_WORDS))
_RARE = ("vlok", "qrum", "zept", "wabe", "plox", "drif")


def tekken_json() -> bytes:
    """A small tekken tokenizer file (Mistral's format: base64 token bytes by rank, special tokens apart):
    the bytes, then each word after a space with every prefix of it (its BPE merges), then _RARE."""
    tokens = [bytes([b]) for b in range(256)]
    for word in _WORDS + _RARE:
        for raw in (" " + word, word):
            for end in range(2, len(raw) + 1):
                piece = raw[:end].encode()
                if piece not in tokens:
                    tokens.append(piece)
    vocab = [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
             for r, t in enumerate(tokens)]
    special = [{"rank": r, "token_str": _SPECIAL.get(r, f"<SPECIAL_{r}>"), "is_control": True}
               for r in range(_SPECIAL_COUNT)]
    config = {"pattern": "", "num_vocab_tokens": len(tokens), "default_vocab_size": _SPECIAL_COUNT + len(tokens),
              "default_num_special_tokens": _SPECIAL_COUNT, "version": "v7"}
    return json.dumps({"config": config, "vocab": vocab, "special_tokens": special}).encode()


def mistral_te_file(seed: int = fc.SEED) -> Tuple[Path, dict]:
    """The pruned Mistral-Small-3 language model (`model.embed_tokens`, `model.layers.N.*`) at MISTRAL_TE,
    with its tokenizer as the `tekken_model` uint8 tensor (the file named by the tokenizer's hash: the
    cache keys a file by its layout), and the config the host gets for it."""
    import torch
    import comfy.ops
    import comfy.text_encoders.llama as llama

    blob = tekken_json()
    config = dict(MISTRAL_TE, vocab_size=_SPECIAL_COUNT + json.loads(blob)["config"]["num_vocab_tokens"])
    with torch.device("meta"):
        m = llama.Mistral3Small24B(dict(config), None, "meta", comfy.ops.disable_weight_init)
    extra = {"tekken_model": torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()}
    stem = "mistral3_24b-" + hashlib.sha256(blob).hexdigest()[:8]
    return _write(stem, fc._shapes(m), seed, extra=extra), config


def flux2_vae_file(seed: int = fc.SEED) -> Path:
    """FLUX.2's autoencoder: the SD KL layout with 32 latent channels and a batch norm over 2x2 patches."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = dict(fc.VAE_DDCONFIG, z_channels=32, batch_norm_latent=True)
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=32)
    layout = {k: v for k, v in fc._shapes(vae).items() if not k.endswith("num_batches_tracked")}
    return _write("flux2_vae", layout, seed, scale={"decoder.conv_out.weight": 0.1, "bn.running_mean": 0.0})


def _flux2_skeleton(hidden, ctx):
    m = fc._meta
    return {"img_in.weight": m(hidden, 128), "txt_in.weight": m(hidden, ctx),
            "double_blocks.0.img_attn.norm.key_norm.scale": m(128), "single_blocks.0.norm.key_norm.scale": m(128),
            "double_stream_modulation_img.lin.weight": m(6 * hidden, hidden),
            "guidance_in.in_layer.weight": m(hidden, 256)}


def _bfl_names(layout: dict) -> dict:
    """BFL's file names: RMSNorm scales `*_norm.scale` (the host's modules call them `weight`)."""
    return {(k[:-len("weight")] + "scale" if k.endswith("_norm.weight") else k): v for k, v in layout.items()}


def _flux2(name: str, seed: int) -> fc.FamilyFiles:
    ctx = 3 * MISTRAL_TE["hidden_size"]
    import comfy.model_detection as md

    skeleton = _flux2_skeleton(128, ctx)
    if (md.detect_unet_config(skeleton, "") or {}).get("image_model") != "flux2":  # 0.3.64: a Flux 1 layout
        raise fc.FamilyUnsupported(f"this host ({fc._host_version()}) has no Flux 2")
    model_config, layout = fc._detect(skeleton)
    if model_config is None or type(model_config).__name__ != "Flux2":
        raise fc.FamilyUnsupported(f"this host ({fc._host_version()}) detects no Flux 2 "
                                   f"({layout if model_config is None else type(model_config).__name__})")
    layout = _bfl_names(layout)
    assert all(layout.get(k) == tuple(v.shape) for k, v in skeleton.items()), "the host builds another Flux 2"
    te, te_config = mistral_te_file(seed)
    return fc.FamilyFiles(
        name=name, model_class="Flux2", diffusion_model=_write(name, layout, seed), text_encoders=(te,),
        clip_type="flux2", vae=flux2_vae_file(seed), latent_channels=128,
        te_model_options={"mistral3_24b_model_config": te_config}, layout={"hidden": 128, "heads": 1, "te": te_config},
        expect={"image_model": "flux2", "hidden_size": 128, "context_in_dim": ctx, "guidance_embed": True})


# Cosmos Predict2's T5-XXL v1.0 (t5_old_config_xxl.json: one ReLU `wi`), 24 blocks for detect_te_model
COSMOS_T5 = {"d_model": 64, "d_ff": 64, "d_kv": 32, "num_heads": 2, "num_layers": 24}


def cosmos_t5_file(seed: int = fc.SEED) -> Path:
    """T5-XXL v1.0's encoder layout (`encoder.block.N.layer.*`, `shared.weight`) at COSMOS_T5."""
    import torch
    import comfy.ops
    import comfy.text_encoders.t5 as t5

    cfg = json.loads((Path(t5.__file__).parent / "t5_old_config_xxl.json").read_text())
    cfg.update(COSMOS_T5)
    with torch.device("meta"):
        m = t5.T5(cfg, None, "meta", comfy.ops.disable_weight_init)
    return _write("t5xxl_old", fc._shapes(m), seed)


def cosmos_detection():
    """Test scaffolding (see the module docstring): the host's detect_unet_config, reading a small Cosmos
    Predict2's head count, block count and text width from its tensors."""
    return detect_unet_config_adjusted(_cosmos_sizes)


def _cosmos_sizes(config: dict, state_dict: dict, p: str) -> None:
    import comfy.model_detection as md

    if config.get("image_model") == "cosmos_predict2" and config["model_channels"] not in (2048, 5120):
        head = state_dict[f"{p}blocks.0.self_attn.q_norm.weight"].shape[0]
        config["num_heads"] = config["model_channels"] // head
        config["num_blocks"] = md.count_blocks(list(state_dict.keys()), f"{p}blocks." + "{}.")
        config["crossattn_emb_channels"] = state_dict[f"{p}blocks.0.cross_attn.k_proj.weight"].shape[1]


def _cosmos_skeleton(width, head, ctx):
    m = fc._meta
    return {"x_embedder.proj.1.weight": m(width, (16 + 1) * 4), "blocks.0.mlp.layer1.weight": m(4 * width, width),
            "blocks.0.self_attn.q_norm.weight": m(head), "blocks.0.cross_attn.k_proj.weight": m(width, ctx)}


def _cosmos_predict2(name: str, seed: int) -> fc.FamilyFiles:
    with cosmos_detection():
        info, layout = fc._choose([(_cosmos_skeleton(128, 64, COSMOS_T5["d_model"]), {"width": 128, "heads": 2})],
                                  "CosmosT2IPredict2")
    return fc.FamilyFiles(
        name=name, model_class="CosmosT2IPredict2", diffusion_model=_write(name, layout, seed),
        text_encoders=(cosmos_t5_file(seed),), clip_type="cosmos", vae=fl.wan21_vae_file(seed),
        te_model_options={"t5xxl_model_config": dict(COSMOS_T5)}, layout=info,
        expect={"image_model": "cosmos_predict2", "model_channels": 128, "num_heads": 2, "num_blocks": 1,
                "crossattn_emb_channels": COSMOS_T5["d_model"]})


FAMILIES = {"flux2": lambda seed: _flux2("flux2", seed),
            "cosmos_predict2": lambda seed: _cosmos_predict2("cosmos_predict2", seed)}


def ensure_family(name: str, seed: int = fc.SEED) -> fc.FamilyFiles:
    """The family's files for the running host (written once); FamilyUnsupported where it detects none."""
    return FAMILIES[name](seed)
