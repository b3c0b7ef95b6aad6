"""Tiny seeded checkpoints of the discrete-schedule transformers ComfyUI loads, in their real key layout,
for tests that may not download anything: PixArt α and PixArt Σ (T5-XXL text, ε on the sqrt-linear
schedule) and Hunyuan-DiT v1.1/1.2 (BERT + mT5-XL text, v-prediction), all with learned-σ output channels.

Test code, beside family_checkpoints.py, whose helpers it uses: the host's own detection picks the layout,
and files are written once into the same cache folder.
  pixart_alpha  PixArtAlpha  one checkpoint (CheckpointLoaderSimple, here without its VAE: below) in ComfyUI's
  pixart_sigma  PixArtSigma  own CheckpointSave layout: `model.diffusion_model.` PixArtMS and
                             `text_encoders.t5xxl.transformer.`. One block; both hosts hard-code the width
                             (1152, 16 heads), the 4-channel input, the learned-σ output (8 channels, of which
                             the model returns the 4 ε ones) and the caption width (4096): ~37 M parameters.
                             They read the depth, the text length (`y_embedder.y_embedding`: 120 for α, 300
                             for Σ) and α's micro-conditioning (`ar_embedder`, which Σ lacks) from the tensors.
                             T5-XXL 4096 wide (the DiT reads 4096-wide text), 2 blocks, d_ff 64: the
                             CLIPLoader would need `detect_te_model`'s 24 blocks (0.33: with d_ff 10240, 3 B
                             parameters), inside the checkpoint its class comes from the model config; the
                             32128-row vocabulary embedding is most of its 135 M parameters.
                             VAE: TAESD through the stock VAELoader (`taesd` for α's SD1.5 latents, `taesdxl`
                             for Σ's SDXL ones: 4 channels, 8x). PixArt computes its position embedding for a
                             base size of round(mean latent side / 64)·64, zero below 33 latents: its images
                             are at least 272 px, where the full-size SD VAE (both hosts hard-code its widths)
                             takes ~13 s a decode on one CPU thread.
  hunyuan_dit   HunyuanDiT   one checkpoint as published for ComfyUI (`model.diffusion_model.`,
                             `text_encoders.hydit_clip.transformer.` BERT, `text_encoders.mt5xl.transformer.`
                             and its `text_encoders.mt5xl.spiece_model`), here without its VAE (taesdxl, as
                             above). Two blocks, 256 wide: the host reads the width and the depth; it
                             hard-codes the 16 heads and the text widths (BERT 1024, mT5 2048), which make the
                             t5 MLP and the attention pooler most of its 45 M parameters. BERT 1 layer (its
                             47020-row vocabulary: 48 M), mT5 2 blocks with the 32000-piece SentencePiece model
                             the host ships (t5_pile_tokenizer) as its `spiece_model`, so a 32128-row vocabulary
                             (66 M) instead of mT5's 250112.
  hunyuan_dit1  HunyuanDiT1  v1.0, the same files; the host tells it apart by its extra embedder's 3968 inputs
                             (pooled text, size and style conditions), which only its full width (1408) makes:
                             one block at that width, ~110 M parameters (the embedders and text MLP most of it).
The text encoders' sizes come in through the host's own hook, load_checkpoint_guess_config's
`te_model_options["<name>_model_config"]` (`t5xxl`, `hydit_clip`, `mt5xl`: sd1_clip.SDClipModel reads it, in
0.3.64 as in 0.33); the T5 and BERT tokenizers are the ones the host ships (comfy/text_encoders).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import family_checkpoints as fc

T5 = dict(fc.T5_4096)  # PixArtMS's caption width (4096) is hard-coded in both hosts
# Hunyuan-DiT's text widths (BERT 1024, mT5 2048) are hard-coded; the mT5 reads the host's 32000-piece
# SentencePiece model (below), so its vocabulary is T5's 32128 rows, not mT5's 250112
BERT = {"num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 2}
MT5 = {"d_ff": 64, "d_kv": 32, "num_heads": 2, "num_layers": 2, "vocab_size": 32128}
_write = fc._write


def _pixart_skeleton(alpha: bool, max_length: int) -> dict:
    m = fc._meta
    sd = {"t_block.1.weight": m(6 * 1152, 1152), "y_embedder.y_embedding": m(max_length, 4096),
          "blocks.0.attn.qkv.weight": m(3 * 1152, 1152)}
    if alpha:
        sd["ar_embedder.mlp.0.weight"] = m(384, 256)
    return sd


def _detected_layout(skeleton: dict, expected_class: str) -> dict:
    """The tensors of the model the running host builds from `skeleton` (family_checkpoints._choose for one
    candidate, the model built with device="meta" rather than under it: PixArtMS calls `.item()` while it
    is built); FamilyUnsupported where the host detects another class or other shapes."""
    import comfy.model_detection as md

    def detect(sd):
        unet_config = md.detect_unet_config(sd, "")
        config = md.model_config_from_unet_config(unet_config, sd) if unet_config is not None else None
        if config is None or type(config).__name__ != expected_class:
            raise fc.FamilyUnsupported(f"this host ({fc._host_version()}) does not detect the layout as "
                                       f"{expected_class} ({unet_config})")
        return fc._shapes(config.get_model(sd, device="meta").diffusion_model)

    layout = detect(skeleton)
    bad = {k: (tuple(v.shape), layout.get(k)) for k, v in skeleton.items() if layout.get(k) != tuple(v.shape)}
    if bad or detect({k: fc._meta(*v) for k, v in layout.items()}) != layout:
        raise fc.FamilyUnsupported(f"this host builds {expected_class} with other shapes: {bad}")
    return layout


def _t5_layout() -> dict:
    import torch
    import comfy.ops
    import comfy.text_encoders.t5 as t5

    with torch.device("meta"):
        te = t5.T5(fc._t5_config(T5), None, "meta", comfy.ops.disable_weight_init)
    return fc._shapes(te)


def _pixart(name: str, alpha: bool, seed: int) -> fc.FamilyFiles:
    expected = "PixArtAlpha" if alpha else "PixArtSigma"
    max_length = 120 if alpha else 300
    info = {"hidden": 1152, "depth": 1, "t5": T5}
    layout = _detected_layout(_pixart_skeleton(alpha, max_length), expected)
    full = {f"model.diffusion_model.{k}": v for k, v in layout.items()}
    full.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in _t5_layout().items()})
    ckpt = _write(name, full, seed)
    return fc.FamilyFiles(
        name=name, model_class=expected, diffusion_model=ckpt, text_encoders=(ckpt,), clip_type="checkpoint",
        vae=taesd_folder(seed) / ("taesd" if alpha else "taesdxl"), latent_channels=4,
        te_model_options={"t5xxl_model_config": dict(T5)}, layout=info,
        expect={"image_model": "pixart_alpha" if alpha else "pixart_sigma", "depth": 1,
                "model_max_length": max_length, "micro_condition": alpha})


def _hunyuan_dit_skeleton(hidden: int, v10: bool = False) -> dict:
    m = fc._meta
    if v10:  # v1.0: one block, its extra embedder reading the pooled text, size and style conditions
        return {"mlp_t5.0.weight": m(4 * 2048, 2048), "x_embedder.proj.weight": m(hidden, 4, 2, 2),
                "extra_embedder.0.weight": m(4 * hidden, 3968), "blocks.0.norm1.weight": m(hidden)}
    return {"mlp_t5.0.weight": m(4 * 2048, 2048), "x_embedder.proj.weight": m(hidden, 4, 2, 2),
            "extra_embedder.0.weight": m(4 * hidden, 1024), "blocks.0.norm1.weight": m(hidden),
            "blocks.1.norm1.weight": m(hidden)}


def _text_layout(module_name: str, config: dict) -> dict:
    """The layout of Hunyuan-DiT's BERT (`hydit_clip`) or mT5-XL (`mt5xl`) at the host's config plus `config`."""
    import torch
    import comfy.ops
    import comfy.text_encoders.bert as bert
    import comfy.text_encoders.t5 as t5

    name, cls = {"hydit_clip": ("hydit_clip.json", bert.BertModel), "mt5xl": ("mt5_config_xl.json", t5.T5)}[module_name]
    cfg = json.loads((Path(t5.__file__).parent / name).read_text())
    cfg.update(config)
    with torch.device("meta"):
        return fc._shapes(cls(cfg, None, "meta", comfy.ops.disable_weight_init))


def _hunyuan_dit(name: str, seed: int, v10: bool = False) -> fc.FamilyFiles:
    import torch
    import comfy.text_encoders.llama as llama

    hidden, depth, cls = (1408, 1, "HunyuanDiT1") if v10 else (256, 2, "HunyuanDiT")
    info = {"hidden": hidden, "heads": 16, "depth": depth, "bert": BERT, "mt5": MT5}
    layout = _detected_layout(_hunyuan_dit_skeleton(hidden, v10), cls)
    full = {f"model.diffusion_model.{k}": v for k, v in layout.items()}
    full.update({f"text_encoders.hydit_clip.transformer.{k}": v for k, v in _text_layout("hydit_clip", BERT).items()})
    full.update({f"text_encoders.mt5xl.transformer.{k}": v for k, v in _text_layout("mt5xl", MT5).items()})
    spm = (Path(llama.__file__).parent / "t5_pile_tokenizer" / "tokenizer.model").read_bytes()
    extra = {"text_encoders.mt5xl.spiece_model": torch.frombuffer(bytearray(spm), dtype=torch.uint8).clone()}
    ckpt = _write(name, full, seed, extra=extra)
    return fc.FamilyFiles(
        name=name, model_class=cls, diffusion_model=ckpt, text_encoders=(ckpt,), clip_type="checkpoint",
        vae=taesd_folder(seed) / "taesdxl", latent_channels=4,
        te_model_options={"hydit_clip_model_config": dict(BERT), "mt5xl_model_config": dict(MT5)}, layout=info,
        expect={"image_model": "hydit1" if v10 else "hydit", "depth": depth, "hidden_size": hidden})


FAMILIES = {"pixart_alpha": lambda seed: _pixart("pixart_alpha", True, seed),
            "pixart_sigma": lambda seed: _pixart("pixart_sigma", False, seed),
            "hunyuan_dit": lambda seed: _hunyuan_dit("hunyuan_dit", seed),
            "hunyuan_dit1": lambda seed: _hunyuan_dit("hunyuan_dit1", seed, v10=True)}


def ensure_family(name: str, seed: int = fc.SEED) -> fc.FamilyFiles:
    """The family's files for the running host (written once); FamilyUnsupported where it detects none."""
    return FAMILIES[name](seed)


def taesd_folder(seed: int = fc.SEED) -> Path:
    """A `vae_approx` folder holding taesd_* and taesdxl_* encoder / decoder files (TAESD's layout, as the
    stock VAELoader reads them), written once."""
    import torch
    from comfy.taesd.taesd import Decoder, Encoder

    with torch.device("meta"):
        parts = {"encoder": fc._shapes(Encoder(latent_channels=4)), "decoder": fc._shapes(Decoder(latent_channels=4))}
    files = {f"{name}_{part}": _write(f"{name}_{part}", layout, seed + i)
             for i, name in enumerate(("taesd", "taesdxl")) for part, layout in parts.items()}
    folder = fc.cache_dir() / ("vae_approx-" + fc._layout_hash({}, json.dumps(sorted(p.name for p in files.values()))))
    if not folder.is_dir():
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
        tmp.mkdir(exist_ok=True)
        for stem, path in files.items():
            shutil.copyfile(path, tmp / f"{stem}.safetensors")
        os.replace(tmp, folder)
    return folder


def load(files: fc.FamilyFiles):
    """(MODEL, CLIP, VAE) as a user's loaders give them: CheckpointLoaderSimple's load_checkpoint_guess_config
    (its te_model_options carry the reduced T5's config; the file has no VAE) and the stock VAELoader's TAESD."""
    import comfy.sd
    import folder_paths
    import nodes as host_nodes

    model, clip = comfy.sd.load_checkpoint_guess_config(str(files.diffusion_model), output_vae=False,
                                                        te_model_options=files.clip_model_options())[:2]
    folder_paths.add_model_folder_path("vae_approx", str(files.vae.parent))
    return model, clip, host_nodes.VAELoader().load_vae(files.vae.name)[0]
