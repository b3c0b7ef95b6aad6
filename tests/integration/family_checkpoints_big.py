"""Tiny seeded checkpoints of the flow families whose sizes the host hard-codes in its detection: Z-Image
(0.33 only), HiDream and Omnigen2, in their real key layout, and the TEST SCAFFOLDING that lets the host
build them small. Test code only: nothing here is part of the pack.

Why scaffolding. `comfy/model_detection.py` (`detect_unet_config`) writes every size of HiDream (16 double +
32 single MoE blocks of 2560: 17 B parameters) and Omnigen2 (32 layers of 2520: ~4 B) whatever the tensors
say, in 0.3.64 as in 0.33, and tells Z-Image from Lumina 2 only by its full width (3840, with the 2+2 refiner
layers: ~0.9 B). A real-layout file of these families therefore cannot be loaded small by the host as
shipped. `reduced_detection()` wraps the host's `comfy.model_detection.model_config_from_unet` (what
UNETLoader and CheckpointLoaderSimple call) while a test loads: for a state dict that carries the family's
detection key at this module's reduced width (`_reduced()`), the host's own function runs on the same tensors
with that one key shown at its published size (Z-Image's `cap_embedder.1.weight`, 3840 rows; HiDream and
Omnigen2 read no size), so the host itself picks the class (ZImage, HiDream, Omnigen2), its sampling and its
config; the wrapper then replaces the hard-coded widths and depths in that config (`Reduced.config`).
Every other state dict goes to the host's function untouched. Everything after detection is the host's own:
the model class, `process_unet_state_dict`, the weights loading, `extra_conds`, the LoRA key map, sampling.
The files are written from the model the wrapped host builds (on the meta device), so they hold exactly its
tensors under its names. (tests/forge/flow_checkpoint.py does the same for Forge's detector.)

Per family (ComfyUI's loaders; text encoders reduced through the host's `<name>_model_config` model_options
hook, which sd1_clip.SDClipModel reads in both copies):
  zimage    ZImage    (0.33) one checkpoint (CheckpointLoaderSimple: `model.diffusion_model.`,
                      `text_encoders.qwen3_4b.transformer.`, `vae.`), as the all-in-one files; its encoder comes
                      from the class's own clip_target, so no text-encoder detection is involved. NextDiT 256
                      wide (2 heads of 128, the host's rope axes; its blocks' modulation reads min(width, 256)
                      features of a time embedding it makes 256 wide, so no narrower), 1 layer + 1+1 refiner
                      layers, Z-Image's modulation and pad tokens. Qwen3-4B's language model
                      (`qwen3_4b_model_config`) 64 wide, 3 layers (the host takes hidden layer -2, and asserts
                      2 < the layer count); its 151936-row embedding stays.
  hidream   HiDream   separate files, as published (UNETLoader; QuadrupleCLIPLoader, whose `detect_te_model`
                      tells each file: CLIP-L, CLIP-G, T5-XXL (24 blocks, HIDREAM_T5), Llama-3.1-8B).
                      2 heads of 32 (rope axes 16/8/8), 1 double + 1 single MoE block (4 experts, 2 active),
                      caption widths of the reduced T5 and Llama, pooled width 128 (CLIP-L + CLIP-G, 64 each);
                      Llama 64 wide, 2 layers, `llama_layers` [0, 1] (one hidden state per block, as the host's
                      list for 48 blocks). The host pads every prompt to 128 T5 and 128 Llama tokens.
                      The host copies these tests run on lack Llama 3's tokenizer.json: `llama_tokenizer()` stands
                      CLIP-L's vocabulary in for it there (see its docstring).
  omnigen2  Omnigen2  one checkpoint (`text_encoders.qwen25_3b.transformer.`, from the class's clip_target).
                      64 wide (2 heads of 32, 1 key/value head, rope axes 8/12/12), 1 layer + 1 refiner layer of
                      each kind. Qwen2.5-VL-3B's language model (`qwen25_3b_model_config`) 64 wide, 1 layer.
The VAE is family_checkpoints' full-size ae16 (the hosts hard-code its widths): Z-Image, HiDream and Omnigen2
use the Flux latent format.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path

import family_checkpoints as fc

QWEN3_4B = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 1,
            "num_key_value_heads": 1}
QWEN25_3B = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
             "num_key_value_heads": 1}
LLAMA = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
         "num_key_value_heads": 1}
WIDTH = 64  # the reduced transformers' inner width
# Z-Image's: its blocks' modulation reads min(width, 256) features of a time embedding the host makes 256 wide
ZIMAGE_WIDTH = 256


@dataclass(frozen=True)
class Reduced:
    model_class: str  # the supported_models class the host detects
    key: str          # the tensor its detection keys the family on; this module's files have it `width` rows
    width: int
    full: tuple = ()  # that tensor's published leading size where the detection reads it (Z-Image), else ()
    config: dict = field(default_factory=dict)  # the hard-coded unet_config entries, reduced


def _reduced(t5_width: int = 64) -> dict:
    return {
        "zimage": Reduced("ZImage", "cap_embedder.1.weight", ZIMAGE_WIDTH, (3840,),
                          {"dim": ZIMAGE_WIDTH, "n_heads": 2, "n_kv_heads": 2, "n_refiner_layers": 1}),
        "hidream": Reduced("HiDream", "caption_projection.0.linear.weight", WIDTH, (),
                           {"attention_head_dim": 32, "num_attention_heads": 2, "axes_dims_rope": [16, 8, 8],
                            "caption_channels": [t5_width, LLAMA["hidden_size"]], "text_emb_dim": 128,
                            "num_layers": 1, "num_single_layers": 1, "llama_layers": [0, 1]}),
        "omnigen2": Reduced("Omnigen2", "time_caption_embed.timestep_embedder.linear_1.bias", WIDTH, (),
                            {"hidden_size": WIDTH, "num_attention_heads": 2, "num_kv_heads": 1,
                             "axes_dim_rope": [8, 12, 12], "num_layers": 1, "num_refiner_layers": 1,
                             "text_feat_dim": QWEN25_3B["hidden_size"]}),
    }


# T5-XXL as the host's detect_te_model tells it (24 blocks; 0.33: `wi_1` 10240 rows, 0.3.64: 4096 columns), every
# other width as small as that allows: HiDream encodes 128 T5 tokens per prompt
HIDREAM_T5 = ({"d_model": 16, "d_ff": 10240, "d_kv": 8, "num_heads": 2, "num_layers": 24},
              {"d_model": 4096, "d_ff": 16, "d_kv": 8, "num_heads": 2, "num_layers": 24})


@functools.lru_cache(maxsize=None)
def _hidream_t5() -> dict:
    """The reduced T5 that the running host's detect_te_model takes for T5-XXL."""
    for t5 in HIDREAM_T5:
        if fc._host_detects_t5xxl(t5):
            return t5
    raise fc.FamilyUnsupported("detect_te_model takes none of the reduced 24-block T5 layouts for T5-XXL")


def _matching(state_dict, prefix: str):
    """The Reduced entry whose detection key this state dict has at the reduced width, else None."""
    t5_width = _hidream_t5()["d_model"] if f"{prefix}caption_projection.0.linear.weight" in state_dict else 64
    for spec in _reduced(t5_width).values():
        t = state_dict.get(prefix + spec.key)
        if t is not None and t.shape[0] == spec.width:
            return spec
    return None


@contextlib.contextmanager
def reduced_detection():
    """The host's `model_config_from_unet` wrapped for this module's files (see the module docstring)."""
    import torch
    import comfy.model_detection as md

    original = md.model_config_from_unet

    def wrapped(state_dict, unet_key_prefix, *args, **kwargs):
        spec = _matching(state_dict, unet_key_prefix)
        if spec is None:
            return original(state_dict, unet_key_prefix, *args, **kwargs)
        view = dict(state_dict)
        if spec.full:
            t = state_dict[unet_key_prefix + spec.key]
            view[unet_key_prefix + spec.key] = torch.empty(spec.full + tuple(t.shape[1:]), device="meta")
        config = original(view, unet_key_prefix, *args, **kwargs)
        if config is None or type(config).__name__ != spec.model_class:
            raise fc.FamilyUnsupported(f"the host detects {type(config).__name__} for the reduced "
                                       f"{spec.model_class} layout")
        config.unet_config.update(spec.config)
        return config

    md.model_config_from_unet = wrapped
    try:
        yield
    finally:
        md.model_config_from_unet = original


@contextlib.contextmanager
def llama_tokenizer():
    """While HiDream's CLIP is built: where the host copy lacks Llama 3's tokenizer
    (`comfy/text_encoders/llama_tokenizer/tokenizer.json`, which ComfyUI ships; the copies these tests run on
    have only its tokenizer_config.json), the host's LLAMA3Tokenizer is given CLIP-L's BPE tokenizer (the
    host's sd1_tokenizer, ids below Llama's 128256) under a name that is not a CLIP one, so the pack looks at
    it as at the Llama tokenizer. Everything else of the tokenizer (start token, padding to 128) is the host's."""
    import comfy.sd1_clip
    import comfy.text_encoders.hunyuan_video as hv
    from transformers import CLIPTokenizer

    folder = Path(hv.__file__).parent / "llama_tokenizer"
    if (folder / "tokenizer.json").is_file():
        yield
        return
    clip_folder = str(Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer")

    class StandInLlamaTokenizer(CLIPTokenizer):
        @classmethod
        def from_pretrained(cls, _path, *args, **kwargs):
            return super().from_pretrained(clip_folder)

    original = hv.LlamaTokenizerFast
    hv.LlamaTokenizerFast = StandInLlamaTokenizer
    try:
        yield
    finally:
        hv.LlamaTokenizerFast = original


def _layout(skeleton: dict, expected: str) -> dict:
    """The tensors (name -> shape) of the diffusion model the wrapped host builds for this skeleton."""
    import torch
    import comfy.model_detection as md

    with reduced_detection():
        config = md.model_config_from_unet(skeleton, "")
    if config is None or type(config).__name__ != expected:
        raise fc.FamilyUnsupported(f"this host ({fc._host_version()}) detects "
                                   f"{type(config).__name__ if config else 'nothing'}, not {expected}")
    with torch.device("meta"):
        model = config.get_model(skeleton)
    return fc._shapes(model.diffusion_model)


def _llm_shapes(cls_name: str, config: dict) -> dict:
    import torch
    import comfy.ops
    import comfy.text_encoders.llama as llama

    with torch.device("meta"):
        m = getattr(llama, cls_name)(dict(config), None, "meta", comfy.ops.disable_weight_init)
    return {k: v for k, v in fc._shapes(m).items() if not k.startswith("visual.")}


def _vae_layout() -> dict:
    from safetensors import safe_open

    with safe_open(str(fc.vae_file()), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _checkpoint(name: str, layout: dict, te_name: str, te_layout: dict, seed: int) -> Path:
    full = {f"model.diffusion_model.{k}": v for k, v in layout.items()}
    full.update({f"text_encoders.{te_name}.transformer.{k}": v for k, v in te_layout.items()})
    full.update({f"vae.{k}": v for k, v in _vae_layout().items()})
    return fc._write(name, full, seed, scale={"vae.decoder.conv_out.weight": 0.1})


def _zimage(seed: int) -> fc.FamilyFiles:
    import comfy.supported_models

    if not hasattr(comfy.supported_models, "ZImage"):
        raise fc.FamilyUnsupported(f"this host ({fc._host_version()}) has no Z-Image")
    m, cap = fc._meta, QWEN3_4B["hidden_size"]
    skeleton = {"cap_embedder.1.weight": m(ZIMAGE_WIDTH, cap), "noise_refiner.0.attention.k_norm.weight": m(128),
                "layers.0.attention.k_norm.weight": m(128), "cap_pad_token": m(1, ZIMAGE_WIDTH)}
    layout = _layout(skeleton, "ZImage")
    ckpt = _checkpoint("zimage", layout, "qwen3_4b", _llm_shapes("Qwen3_4B", QWEN3_4B), seed)
    return fc.FamilyFiles(name="zimage", model_class="ZImage", diffusion_model=ckpt, text_encoders=(ckpt,),
                          clip_type="checkpoint", vae=ckpt, te_model_options={"qwen3_4b_model_config": dict(QWEN3_4B)},
                          expect={"image_model": "lumina2", "dim": ZIMAGE_WIDTH, "n_layers": 1, "cap_feat_dim": cap,
                                  "z_image_modulation": True, "pad_tokens_multiple": 32})


def _hidream(seed: int) -> fc.FamilyFiles:
    t5 = _hidream_t5()
    m = fc._meta
    skeleton = {"caption_projection.0.linear.weight": m(WIDTH, LLAMA["hidden_size"])}
    layout = _layout(skeleton, "HiDream")
    llama = fc._write("llama31_8b", _llm_shapes("Llama2", dict(LLAMA, vocab_size=128256)), seed)
    return fc.FamilyFiles(
        name="hidream", model_class="HiDream", diffusion_model=fc._write("hidream", layout, seed),
        text_encoders=(fc.clip_file("clip_l", seed), fc.clip_file("clip_g", seed), fc.t5_file(t5, seed), llama),
        clip_type="hidream", vae=fc.vae_file(seed),
        te_model_options={"model_config": dict(fc.CLIP_OVERRIDES), "t5xxl_model_config": dict(t5),
                          "llama_model_config": dict(LLAMA)},
        expect={"image_model": "hidream", "num_layers": 1, "num_single_layers": 1,
                "caption_channels": [t5["d_model"], LLAMA["hidden_size"]]})


def _omnigen2(seed: int) -> fc.FamilyFiles:
    m = fc._meta
    skeleton = {"time_caption_embed.timestep_embedder.linear_1.bias": m(WIDTH)}
    layout = _layout(skeleton, "Omnigen2")
    ckpt = _checkpoint("omnigen2", layout, "qwen25_3b", _llm_shapes("Qwen25_3B", QWEN25_3B), seed)
    return fc.FamilyFiles(name="omnigen2", model_class="Omnigen2", diffusion_model=ckpt, text_encoders=(ckpt,),
                          clip_type="checkpoint", vae=ckpt,
                          te_model_options={"qwen25_3b_model_config": dict(QWEN25_3B)},
                          expect={"image_model": "omnigen2", "hidden_size": WIDTH, "num_layers": 1,
                                  "text_feat_dim": QWEN25_3B["hidden_size"]})


FAMILIES = {"zimage": _zimage, "hidream": _hidream, "omnigen2": _omnigen2}


@functools.lru_cache(maxsize=None)
def ensure_family(name: str, seed: int = fc.SEED) -> fc.FamilyFiles:
    """The family's files for the running host (written once); FamilyUnsupported where it has no such family."""
    return FAMILIES[name](seed)


def load(files: fc.FamilyFiles):
    """(MODEL, CLIP, VAE) as a user's loaders give them, with the host's detection wrapped (reduced_detection)."""
    import comfy.sd

    with reduced_detection():
        if files.clip_type != "checkpoint":
            with llama_tokenizer():
                return files.load_model(), files.load_clip(), files.load_vae()
        out = comfy.sd.load_checkpoint_guess_config(str(files.diffusion_model),
                                                    te_model_options=files.clip_model_options())
    return out[0], out[1], out[2]
