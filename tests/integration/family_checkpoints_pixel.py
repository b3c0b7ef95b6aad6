"""A tiny seeded Chroma Radiance (Chroma's transformer on 16x16 pixel patches with a per-pixel NeRF head, no
VAE latents), in its real key layout, for tests that may not download anything.

Test code, beside family_checkpoints.py, whose helpers it uses; files go into the same cache folder.
  chroma_radiance  ChromaRadiance  (both hosts) one double + one single block, 128 wide (one head of 128, the
                  axes the host hard-codes), an approximator of one 32-wide layer, two NeRF blocks 16 wide
                  (mlp ratio 2), the linear NeRF head, patches of 16: 1.1 M parameters on 0.33, 1.6 M on 0.3.64
                  (its `txt_in` reads the 4096-wide T5, see below). BFL's names: RMSNorm scales `*.scale`
                  (0.33 renames them on load).
                  CLIPLoader type `chroma`: Chroma's 24-block T5 (family_checkpoints.T5_XXL_DETECTED: the
                  host's detect_te_model must take it for T5-XXL; 64 wide on 0.33, 4096 on 0.3.64).
                  VAE: the host's `pixel_space` VAE (VAELoader's "pixel_space": a file holding only
                  `pixel_space_vae`): images in [0, 1] become "latents" in [-1, 1], [B, 3, H, W].
                  Scaffolding (test code, not the pack): both hosts hard-code Chroma's approximator
                  (5 layers of 5120, 3072 out: 278 M parameters that run at every forward) and the NeRF head
                  (64 wide, 4 blocks, ratio 4); 0.3.64 also the transformer (3072 wide, 24 heads, 4096-wide
                  text). `radiance_detection()` wraps `comfy.model_detection.detect_unet_config` while the test
                  loads this file, so that for a width the host does not know (txt_in not 3072 rows) it reads
                  those sizes from the tensors as 0.33 reads the width: the width and text width from
                  `txt_in`, the head count from the key norm's width, the approximator's from its norms,
                  layers and `out_proj`, the NeRF head's from its first block's norm and `param_generator`
                  and the block count. Real (3072-wide) checkpoints are left to the host's own values.
  chroma_radiance_x0  ChromaRadiance  (0.33 only: 0.3.64 has no x0 variant) the same with the `__x0__`
                  marker of the x0-predicting Radiance releases: the host's model turns its x0 into the
                  velocity itself ((x − x0)/σ), which is the output the backend reads.
"""
from __future__ import annotations

from pathlib import Path

import family_checkpoints as fc
from detection_scaffold import detect_unet_config_adjusted

_write = fc._write

WIDTH, HEAD, APPROX, NERF, NERF_RATIO, NERF_DEPTH, PATCH = 128, 128, 32, 16, 2, 2, 16


def radiance_detection():
    """Test scaffolding (see the module docstring): the host's detect_unet_config, reading a small Chroma
    Radiance's widths from its tensors."""
    return detect_unet_config_adjusted(_radiance_sizes)


def _radiance_sizes(config: dict, state_dict: dict, p: str) -> None:
    import comfy.model_detection as md

    small = state_dict.get(f"{p}txt_in.weight") is not None and state_dict[f"{p}txt_in.weight"].shape[0] != 3072
    if config.get("image_model") == "chroma_radiance" and small:
        keys = list(state_dict.keys())
        hidden, ctx = state_dict[f"{p}txt_in.weight"].shape
        nerf = state_dict[f"{p}nerf_blocks.0.norm.scale"].shape[0]
        config.update(
            hidden_size=hidden, context_in_dim=ctx,
            num_heads=hidden // state_dict[f"{p}double_blocks.0.img_attn.norm.key_norm.scale"].shape[0],
            hidden_dim=state_dict[f"{p}distilled_guidance_layer.norms.0.scale"].shape[0],
            out_dim=state_dict[f"{p}distilled_guidance_layer.out_proj.weight"].shape[0],
            n_layers=md.count_blocks(keys, f"{p}distilled_guidance_layer.norms." + "{}."),
            nerf_hidden_size=nerf, nerf_depth=md.count_blocks(keys, f"{p}nerf_blocks." + "{}."),
            nerf_mlp_ratio=state_dict[f"{p}nerf_blocks.0.param_generator.weight"].shape[0] // (3 * nerf * nerf))


def _skeleton(ctx: int, x0: bool) -> dict:
    m = fc._meta
    marker = {"__x0__": m(0)} if x0 else {}
    return {**marker, "txt_in.weight": m(WIDTH, ctx), "img_in_patch.weight": m(WIDTH, 3, PATCH, PATCH),
            "double_blocks.0.img_attn.norm.key_norm.scale": m(HEAD), "single_blocks.0.norm.key_norm.scale": m(HEAD),
            "distilled_guidance_layer.norms.0.scale": m(APPROX),
            "distilled_guidance_layer.out_proj.weight": m(WIDTH, APPROX),
            **{f"nerf_blocks.{i}.norm.scale": m(NERF) for i in range(NERF_DEPTH)},
            "nerf_blocks.0.param_generator.weight": m(3 * NERF * NERF * NERF_RATIO, WIDTH)}


def _detect(skeleton: dict):
    """(model_config, file layout under BFL's names: every RMSNorm's `weight` as `scale`) of the running host."""
    import torch
    import comfy.model_detection as md

    with radiance_detection():
        unet_config = md.detect_unet_config(skeleton, "")
        model_config = md.model_config_from_unet_config(unet_config, skeleton) if unet_config else None
    if model_config is None:
        raise fc.FamilyUnsupported(f"this host ({fc._host_version()}) detects no Chroma Radiance ({unet_config})")
    with torch.device("meta"):
        dm = model_config.get_model(skeleton).diffusion_model
    rms = {n for n, mod in dm.named_modules() if "RMSNorm" in type(mod).__name__}
    layout = {}
    for k, shape in fc._shapes(dm).items():
        mod, _, leaf = k.rpartition(".")
        layout[mod + ".scale" if mod in rms and leaf == "weight" else k] = shape
    return model_config, layout


def pixel_space_vae_file(seed: int = fc.SEED) -> Path:
    """What VAELoader's `pixel_space` choice loads: one `pixel_space_vae` tensor (1.0)."""
    import torch

    return _write("pixel_space_vae", {"pixel_space_vae": ()}, seed, dtype=torch.float32)


def _chroma_radiance(name: str, seed: int, x0: bool = False) -> fc.FamilyFiles:
    t5 = next((c for c in fc.T5_XXL_DETECTED if fc._host_detects_t5xxl(c)), None)
    if t5 is None:
        raise fc.FamilyUnsupported("detect_te_model takes none of the reduced 24-block T5 layouts for T5-XXL")
    skeleton = _skeleton(t5["d_model"], x0)
    model_config, layout = _detect(skeleton)
    bad = {k: (tuple(v.shape), layout.get(k)) for k, v in skeleton.items() if layout.get(k) != tuple(v.shape)}
    if type(model_config).__name__ != "ChromaRadiance" or bad:
        raise fc.FamilyUnsupported(f"this host ({fc._host_version()}) builds {type(model_config).__name__} "
                                   f"{'without the x0 variant: ' if x0 else ''}{bad}")
    again, layout2 = _detect({k: fc._meta(*s) for k, s in layout.items()})
    assert type(again).__name__ == "ChromaRadiance" and layout2 == layout, "the full file is not detected back"
    return fc.FamilyFiles(
        name=name, model_class="ChromaRadiance", diffusion_model=_write(name, layout, seed),
        text_encoders=(fc.t5_file(t5, seed),), clip_type="chroma", vae=pixel_space_vae_file(seed), latent_channels=3,
        te_model_options={"t5xxl_model_config": dict(t5)}, layout={"hidden": WIDTH, "t5": t5},
        expect={"image_model": "chroma_radiance", "hidden_size": WIDTH, "context_in_dim": t5["d_model"],
                "hidden_dim": APPROX, "n_layers": 1, "nerf_hidden_size": NERF, "nerf_depth": NERF_DEPTH,
                "patch_size": PATCH, **({"use_x0": True} if x0 else {})})


FAMILIES = {"chroma_radiance": lambda seed: _chroma_radiance("chroma_radiance", seed),
            "chroma_radiance_x0": lambda seed: _chroma_radiance("chroma_radiance_x0", seed, x0=True)}


def ensure_family(name: str, seed: int = fc.SEED) -> fc.FamilyFiles:
    """The family's files for the running host (written once); FamilyUnsupported where it detects none."""
    return FAMILIES[name](seed)
