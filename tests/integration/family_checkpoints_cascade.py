"""A tiny seeded Stable Cascade stage C checkpoint (the text-conditional prior) in its real key layout, for tests
that may not download anything.

Test code, beside family_checkpoints.py, whose helpers it uses; files go into the same cache folder.
  stable_cascade_c  Stable_Cascade_C  (both hosts) one checkpoint as Load Checkpoint reads it:
                  `model.diffusion_model.` StageC, two levels 64 wide (2 heads of 32), one C/T/A triple per
                  level down and up (the host's level_config 'CTA'; 0.56 M parameters);
                  `text_encoder.clip_g.transformer.` CLIP-G
                  64 wide (family_checkpoints.CLIP_OVERRIDES, through load_checkpoint_guess_config's
                  te_model_options["clip_g_model_config"]: a real CLIP-G is 0.7 B parameters) and `vae.` the
                  stage C coder: the EfficientNet-V2-S encoder and the previewer decoder at their real sizes
                  (both hosts hard-code them: 24 M parameters). One 56 MB fp16 file, shared by both hosts.
                  Scaffolding (test code, not the pack): both hosts read only "stage c, full or lite" from the
                  tensors (`clip_txt_mapper` 2048 or 1536 rows) and hard-code the rest (3.6 B parameters for
                  the full model, 1 B for lite). `cascade_detection()` wraps
                  `comfy.model_detection.detect_unet_config` while the test loads this file, so that for a
                  width the host does not know it reads the sizes from the tensors: c_cond and the text widths
                  from `clip_txt_mapper` / `clip_txt_pooled_mapper`, each level's width from its first
                  ResBlock's depthwise conv, heads of 32, the depths from the block counts. Real checkpoints
                  are left to the host's own values.
"""
from __future__ import annotations


import family_checkpoints as fc
from detection_scaffold import detect_unet_config_adjusted

_write = fc._write

WIDTH, HEAD_WIDTH, LEVELS = 64, 32, 2
CLIP_G = dict(fc.CLIP_OVERRIDES)  # 64 wide, projection 64: stage C reads 64-wide text and pooled vectors


def cascade_detection():
    """Test scaffolding (see the module docstring): the host's detect_unet_config, reading a small stage C's
    sizes from its tensors."""
    return detect_unet_config_adjusted(_cascade_sizes)


def _cascade_sizes(config: dict, state_dict: dict, p: str) -> None:
    import comfy.model_detection as md

    mapper = state_dict.get(f"{p}clip_txt_mapper.weight")
    if config.get("stable_cascade_stage") == "c" and mapper is not None and mapper.shape[0] not in (1536, 2048):
        keys = list(state_dict.keys())
        levels = md.count_blocks(keys, f"{p}down_blocks." + "{}.")
        widths = [state_dict[f"{p}down_blocks.{i}.0.depthwise.weight"].shape[0] for i in range(levels)]
        down = [md.count_blocks(keys, f"{p}down_blocks.{i}." + "{}.") // 3 for i in range(levels)]
        up = [md.count_blocks(keys, f"{p}up_blocks.{i}." + "{}.") // 3 for i in range(levels)]
        config.update(c_cond=mapper.shape[0], c_clip_text=mapper.shape[1],
                      c_clip_text_pooled=state_dict[f"{p}clip_txt_pooled_mapper.weight"].shape[1],
                      c_hidden=widths, nhead=[w // HEAD_WIDTH for w in widths], blocks=[down, up],
                      block_repeat=[[1] * levels, [1] * levels], level_config=["CTA"] * levels)


def _skeleton() -> dict:
    m = fc._meta
    sd = {"clf.1.weight": m(16, WIDTH, 1, 1), "clip_txt_mapper.weight": m(WIDTH, CLIP_G["hidden_size"]),
          "clip_txt_pooled_mapper.weight": m(4 * WIDTH, CLIP_G["projection_dim"])}
    for side in ("down", "up"):
        for level in range(LEVELS):
            for i in range(3):
                sd[f"{side}_blocks.{level}.{i}.marker"] = m(1)
            sd[f"{side}_blocks.{level}.0.depthwise.weight"] = m(WIDTH, 1, 3, 3)
    return sd


def _detect(skeleton: dict):
    import comfy.model_detection as md

    with cascade_detection():
        unet_config = md.detect_unet_config(skeleton, "")
        model_config = md.model_config_from_unet_config(unet_config, skeleton) if unet_config else None
    if model_config is None or type(model_config).__name__ != "Stable_Cascade_C":
        raise fc.FamilyUnsupported(f"this host ({fc._host_version()}) detects no stage C ({unet_config})")
    # built with device="meta", not under it: its sampling object tabulates 10⁴ σ, slow on meta tensors
    return model_config, fc._shapes(model_config.get_model(skeleton, device="meta").diffusion_model)


def _text_layout() -> dict:
    import torch
    import comfy.sdxl_clip

    with torch.device("meta"):
        te = comfy.sdxl_clip.StableCascadeClipModel(device="meta", model_options={"clip_g_model_config": CLIP_G})
    return fc._shapes(te)


def _vae_layout() -> dict:
    import torch
    from comfy.ldm.cascade.stage_c_coder import StageC_coder

    with torch.device("meta"):
        coder = StageC_coder()
    return {k: tuple(v.shape) for k, v in coder.state_dict().items()}


def _stable_cascade_c(name: str, seed: int) -> fc.FamilyFiles:
    model_config, layout = _detect(_skeleton())
    again, layout2 = _detect({k: fc._meta(*s) for k, s in layout.items()})
    assert layout2 == layout, "the full file is not detected back"
    full = {f"model.diffusion_model.{k}": v for k, v in layout.items()}
    full.update({f"text_encoder.{k}": v for k, v in _text_layout().items()})
    full.update({f"vae.{k}": v for k, v in _vae_layout().items()})
    # The encoder's mapper scaled down (latents of about unit spread) and the previewer's last conv (decoded
    # previews mostly inside [0, 1]).
    ckpt = _write(name, full, seed, scale={"encoder.mapper.0.weight": 0.1, "previewer.blocks.24.weight": 0.1})
    return fc.FamilyFiles(
        name=name, model_class="Stable_Cascade_C", diffusion_model=ckpt, text_encoders=(ckpt,), clip_type="checkpoint",
        vae=ckpt, te_model_options={"clip_g_model_config": dict(CLIP_G)},
        layout={"hidden": WIDTH, "levels": LEVELS, "clip_g": CLIP_G},
        expect={"stable_cascade_stage": "c", "c_cond": WIDTH, "c_hidden": [WIDTH] * LEVELS,
                "blocks": [[1] * LEVELS, [1] * LEVELS]})


FAMILIES = {"stable_cascade_c": lambda seed: _stable_cascade_c("stable_cascade_c", seed)}


def ensure_family(name: str, seed: int = fc.SEED) -> fc.FamilyFiles:
    """The family's files for the running host (written once); FamilyUnsupported where it detects none."""
    return FAMILIES[name](seed)


def load(files: fc.FamilyFiles):
    """(MODEL, CLIP, VAE) as Load Checkpoint gives them (load_checkpoint_guess_config; its te_model_options carry
    the reduced CLIP-G's config), under the detection scaffolding."""
    import comfy.sd

    with cascade_detection():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(files.diffusion_model),
                                                                 te_model_options=files.clip_model_options())[:3]
    return model, clip, vae

