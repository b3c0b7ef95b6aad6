"""Tiny seeded checkpoints in the real key layout of the flow-matching families ComfyUI loads, for tests
that may not download anything: Flux (dev and schnell), SD3, SD3.5, Chroma and Lumina 2.

Test code: it imports comfy (run it under the host's Python, after conftest's `_host_in_process()`).
Each family is written the way its models are published for ComfyUI's separate loaders: a diffusion
model alone (UNETLoader, `comfy.sd.load_diffusion_model`), its text encoder file(s) (CLIPLoader /
DualCLIPLoader / TripleCLIPLoader, `comfy.sd.load_clip`) and a VAE (VAELoader, `comfy.sd.VAE`).

How a width is chosen. ComfyUI infers some sizes of a diffusion model from its tensors and hard-codes
the others (`comfy/model_detection.py`, `detect_unet_config`), and the two host copies differ. For every
family this module lists candidate layouts from the smallest up, asks the running host's own
`detect_unet_config` / `model_config_from_unet_config` about a shape-only (meta) skeleton of each,
builds the detected model on the meta device and keeps the first candidate whose detected model has
exactly the skeleton's shapes. The file then holds every tensor of that model (nothing missing, nothing
unexpected), under the names of the published checkpoints (Flux and Chroma keep BFL's `*.scale` names
for RMSNorm, which ComfyUI 0.33 renames to `.weight` in `process_unet_state_dict`). The width therefore
follows the host: Flux is 256 wide (2 heads of 128) where the host reads `hidden_size` from `img_in`
(0.33) and 3072 wide (24 heads) where it hard-codes it (0.3.64). Depth is one block of each kind.

Per family: `model_class` is `type(model.model.model_config).__name__`; text encoders are listed in
loader order with the CLIPLoader/DualCLIPLoader `type`; every family uses the ae16 VAE; both host copies
(0.3.64 and 0.33) detect every family here.
  flux_dev      Flux         one double + one single block, `guidance_in` (guidance_embed True);
                             3072 wide on 0.3.64, 256 wide on 0.33.
                             DualCLIPLoader type `flux`: clip_l, t5xxl (4096 wide on 0.3.64, 64 on 0.33).
  flux_schnell  FluxSchnell  the same without `guidance_in`. DualCLIPLoader type `flux`: as flux_dev.
  sd3           SD3          MMDiT depth 2 (128 wide, 2 heads of 64), SD3-medium layout, pos_embed 32x32
                             patches (latents up to 64x64, 512 px images).
                             TripleCLIPLoader: clip_l, clip_g, t5xxl (4096 wide). (`type` sd3 for two.)
  sd35          SD3          as sd3 plus RMS q/k norms and `x_block.attn2` in block 0 (SD3.5 medium).
  chroma        Chroma       3072 wide and an approximator of 5 x 5120 (both hard-coded in both copies:
                             the modulation vectors are 3072 wide), one double + one single block.
                             CLIPLoader type `chroma`: one t5xxl with 24 blocks.
  lumina2       Lumina2      NextDiT dim 2304 (hard-coded in 0.3.64; the one small width 0.33 knows heads
                             for), 1 layer plus the 2+2 refiner layers the class always has.
                             CLIPLoader type `lumina2`: gemma2_2b (with its `spiece_model`).
Sizes (parameters): Flux 543 M (0.3.64) / 3.9 M (0.33); SD3 1.7 M; Chroma ~620 M; Lumina 2 ~420 M
(0.3.64's layout has `norm_final.weight`, 0.33's NextDiT has not).

ae16 is the KL autoencoder of Flux/SD3 (`encoder.*`/`decoder.*`, 16 latent channels, ch 128, ch_mult
1,2,4,4: both hosts hard-code those widths, so it is full size, ~84 M parameters). Latents are
[B, 16, H/8, W/8] for every family here.

Text encoders cannot be shrunk for the loader *nodes*: the host builds CLIP-L, CLIP-G, T5-XXL and
Gemma-2 from fixed configs (`sd1_clip_config.json`, `clip_config_bigg.json`, `t5_config_xxl.json`,
`llama.Gemma2_2B_Config`), in 0.33 as in 0.3.64; it reads no width from the tensors. The host's own
Python loader takes config overrides through `model_options`, which is what `FamilyFiles.load_clip`
passes to `comfy.sd.load_clip` (the CLIPLoader nodes pass none: given these files they stop on a size
mismatch in `load_state_dict`, on both copies; a real-size T5-XXL is 4.7 B parameters, Gemma-2 2.6 B):
  - `model_options["model_config"]`: every CLIP-L / CLIP-G file. `long_clipl.model_options_long_clip`
    overwrites `clip_l_model_config` / `clip_g_model_config` with this dict (plus the position count
    it reads from the file), so per-name CLIP overrides are lost; CLIP-L and CLIP-G therefore get the
    same widths and keep their own depths (12 and 32 layers: SD3's `load_sd` routes a file to clip_g
    only if it has `layers.30`).
  - `model_options["t5xxl_model_config"]`, `model_options["gemma2_2b_model_config"]`.
Where the host's CLIP type decides by detection (one file: CLIPLoader), the file must also pass
`detect_te_model`: a T5 counts as T5-XXL only with 24 blocks and `wi_1` 4096 wide (0.3.64: `shape[-1]`)
or 10240 rows (0.33: `shape[0]`), so Chroma's T5 is 24 blocks deep and its other widths follow the host.
SD3's text encoder pads CLIP-L+CLIP-G to 4096 and concatenates T5 after it, so its T5 must be 4096 wide
(the vocabulary embedding, 32128 x 4096, is most of its 135 M parameters); where Flux's `txt_in` width is
read from the tensors (0.33) Flux gets a 64-wide T5.

Not here: HiDream (every size hard-coded in both copies: 16 double + 32 single MoE blocks, 17.1 B
parameters, and a Llama-3.1-8B encoder), Qwen-Image (DiT inner width 3072 and text width 3584 hard-coded:
380 M parameters with one block; its Qwen2.5-VL encoder needs the 152064 x 3584 embedding, 545 M, as the
tokenizer's ids reach 151k, and the class always builds the 1280-wide vision tower), and the
video/audio/inpainting families.

Every value is drawn from a generator seeded by the tensor's name (and `seed`), so a file is the same
on every machine and run; files are written once (atomically) into a cache folder keyed by VERSION and
this file's text, named by a hash of their layout, and shared by the host copies where layouts agree
(first run: ~3.4 GB for 0.3.64, ~2.3 GB for 0.33; older versions' folders are removed after an hour).

Use (after conftest's `host` fixture or `_host_in_process()`):
    files = family_checkpoints.ensure_family("flux_dev")    # FamilyUnsupported: the host detects no layout
    model = files.load_model()     # comfy.sd.load_diffusion_model (UNETLoader; the file is in files.diffusion_model)
    clip = files.load_clip()       # comfy.sd.load_clip(files.text_encoders, clip_type, model_options)
    vae = files.load_vae()         # comfy.sd.VAE (VAELoader)
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

VERSION = "family-ckpt-v1"
SEED = 0

# Text encoder widths (the host's loader gets them via model_options, see the module docstring).
CLIP_OVERRIDES = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "projection_dim": 64}
T5_SMALL = {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}
T5_4096 = {"d_model": 4096, "d_ff": 64, "d_kv": 32, "num_heads": 2, "num_layers": 2}
# Chroma's single-file loader needs detect_te_model to say T5-XXL: 24 blocks and, per host, d_ff 10240
# (0.33) or d_model 4096 (0.3.64).
T5_XXL_DETECTED = ({"d_model": 64, "d_ff": 10240, "d_kv": 32, "num_heads": 2, "num_layers": 24},
                   {"d_model": 4096, "d_ff": 16, "d_kv": 16, "num_heads": 2, "num_layers": 24})
GEMMA_OVERRIDES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
                   "num_key_value_heads": 1}
VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


class FamilyUnsupported(Exception):
    """The running host detects none of the family's candidate layouts (the message says why)."""


@dataclass
class FamilyFiles:
    name: str
    model_class: str                      # type(model.model.model_config).__name__ after loading
    diffusion_model: Path                 # UNETLoader / comfy.sd.load_diffusion_model
    text_encoders: tuple                  # in loader order (clip_name1, clip_name2, ...)
    clip_type: str                        # CLIPLoader/DualCLIPLoader `type`; comfy.sd.CLIPType[clip_type.upper()]
    vae: Path                             # VAELoader / comfy.sd.VAE
    latent_channels: int = 16
    te_model_options: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)  # the widths the host made us choose (for messages)
    expect: dict = field(default_factory=dict)  # entries of model.model.model_config.unet_config

    def clip_model_options(self) -> dict:
        """`model_options` for comfy.sd.load_clip (a fresh copy: the host mutates it)."""
        return copy.deepcopy(self.te_model_options)

    def clip_type_enum(self):
        import comfy.sd

        return getattr(comfy.sd.CLIPType, self.clip_type.upper())

    def load_model(self):
        import comfy.sd

        return comfy.sd.load_diffusion_model(str(self.diffusion_model))

    def load_clip(self):
        import comfy.sd

        return comfy.sd.load_clip([str(p) for p in self.text_encoders], clip_type=self.clip_type_enum(),
                                  model_options=self.clip_model_options())

    def load_vae(self):
        import comfy.sd
        import comfy.utils

        return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(self.vae)))


# --------------------------------------------------------------------------------------------- values

def _fill(name: str, shape, seed: int):
    """Deterministic, well-scaled values: biases 0, other 1-D tensors (norm scales) 1, embeddings
    N(0, 0.02), other weights N(0, 1/fan_in); CLIP layer-norm biases ~0.1 (as mini_checkpoint)."""
    import torch

    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + seed) % (2**31))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" and "layer_norm" in name and "text_model" in name:
        return 0.1 + 0.05 * torch.randn(shape, generator=g)
    if leaf == "bias":
        return torch.zeros(shape)
    if len(shape) <= 1:
        return torch.ones(shape)
    t = torch.empty(shape)
    if name == "shared.weight" or name.endswith(("token_embedding.weight", "embed_tokens.weight")):
        return t.normal_(0.0, 0.02, generator=g)
    fan_in = max(1, t[0].numel())
    return t.normal_(0.0, fan_in ** -0.5, generator=g)


def _layout_hash(layout: dict, extra: str = "") -> str:
    text = json.dumps(sorted((k, list(v)) for k, v in layout.items())) + extra
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def cache_dir() -> Path:
    root = os.environ.get("DREAMBOOTH_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "dreambooth-test-cache")
    digest = hashlib.sha256((VERSION + Path(__file__).read_text()).encode()).hexdigest()[:12]
    path = Path(root) / f"{VERSION}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    if not _PRUNED:
        _PRUNED.append(path)
        _prune(path)
    return path


_PRUNED: list = []


def _prune(current: Path, age_s: float = 3600.0) -> None:
    """Remove this fixture's folders of other versions (GBs each) not written to for `age_s`."""
    import shutil
    import time

    prefix = VERSION.rsplit("-", 1)[0] + "-"
    for old in current.parent.glob(prefix + "*"):
        try:
            if old != current and old.is_dir() and time.time() - old.stat().st_mtime > age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _write(stem: str, layout: dict, seed: int, *, scale: dict | None = None, extra: dict | None = None,
           dtype=None) -> Path:
    """The file for `layout` (name -> shape), written once into the cache folder."""
    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.float16
    tag = json.dumps({"seed": seed, "scale": scale or {}, "dtype": str(dtype), "extra": sorted(extra or {})})
    path = cache_dir() / f"{stem}-{_layout_hash(layout, tag)}.safetensors"
    if path.is_file():
        return path
    sd = {}
    for name, shape in layout.items():
        t = _fill(name, tuple(shape), seed)
        for suffix, factor in (scale or {}).items():
            if name.endswith(suffix):
                t.mul_(factor)
        sd[name] = t.to(dtype).contiguous()
    sd.update(extra or {})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(sd, str(tmp), metadata={"dreambooth_test": f"{VERSION} {stem}"})  # one key: a stable header
    os.replace(tmp, path)
    return path


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}


# ---------------------------------------------------------------------------------- text encoders

def _clip_config(which: str) -> dict:
    import comfy.sd1_clip

    name = "sd1_clip_config.json" if which == "clip_l" else "clip_config_bigg.json"
    cfg = json.loads((Path(comfy.sd1_clip.__file__).parent / name).read_text())
    cfg.update(CLIP_OVERRIDES)
    return cfg


def clip_file(which: str, seed: int = SEED) -> Path:
    """CLIP-L (12 layers) or CLIP-G (32 layers), 64 wide, in the `text_model.*` layout of clip_l.safetensors
    / clip_g.safetensors."""
    import torch
    import comfy.ops
    from comfy.clip_model import CLIPTextModel

    with torch.device("meta"):
        m = CLIPTextModel(_clip_config(which), None, "meta", comfy.ops.disable_weight_init)
    return _write(which, _shapes(m), seed)


def t5_file(config: dict, seed: int = SEED) -> Path:
    """T5-XXL's encoder layout (`encoder.block.N.layer.*`, `shared.weight`) with the widths of `config`."""
    import torch
    import comfy.ops
    import comfy.text_encoders.t5 as t5

    cfg = _t5_config(config)
    with torch.device("meta"):
        m = t5.T5(cfg, None, "meta", comfy.ops.disable_weight_init)
    return _write("t5xxl", _shapes(m), seed)


def _t5_config(config: dict) -> dict:
    import comfy.text_encoders.t5

    cfg = json.loads((Path(comfy.text_encoders.t5.__file__).parent / "t5_config_xxl.json").read_text())
    cfg.update(config)
    return cfg


def _host_detects_t5xxl(config: dict) -> bool:
    import torch
    import comfy.ops
    import comfy.sd
    import comfy.text_encoders.t5 as t5

    with torch.device("meta"):
        m = t5.T5(_t5_config(config), None, "meta", comfy.ops.disable_weight_init)
    return comfy.sd.detect_te_model(m.state_dict()) == comfy.sd.TEModel.T5_XXL


def gemma_file(seed: int = SEED) -> Path:
    """Gemma-2-2B's layout (`model.embed_tokens`, `model.layers.N.*`, `model.norm`) 64 wide, 3 layers, plus
    the `spiece_model` tensor the host reads its tokenizer from: a SentencePiece model the host ships
    (`t5_pile_tokenizer/tokenizer.model`, 32000 pieces: every id fits Gemma's 256000-row embedding)."""
    import torch
    import comfy.ops
    import comfy.text_encoders.llama as llama

    cfg = dict(GEMMA_OVERRIDES)
    with torch.device("meta"):
        m = llama.Gemma2_2B(cfg, None, "meta", comfy.ops.disable_weight_init)
    spm = (Path(llama.__file__).parent / "t5_pile_tokenizer" / "tokenizer.model").read_bytes()
    extra = {"spiece_model": torch.frombuffer(bytearray(spm), dtype=torch.uint8).clone()}
    return _write("gemma2_2b", _shapes(m), seed, extra=extra)


def vae_file(seed: int = SEED) -> Path:
    """The 16-channel KL autoencoder of Flux/SD3 (ae.safetensors layout: `encoder.*`, `decoder.*`)."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    with torch.device("meta"):
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": VAE_DDCONFIG},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": VAE_DDCONFIG})
    # The decoder's last conv is scaled down so decoded images stay mostly inside [-1, 1].
    return _write("ae16", _shapes(vae), seed, scale={"decoder.conv_out.weight": 0.1})


# --------------------------------------------------------------------------------- diffusion models

def _meta(*shape):
    import torch

    return torch.empty(shape, device="meta")


def _flux_skeleton(hidden, ctx, vec, guidance):
    sd = {"img_in.weight": _meta(hidden, 64), "txt_in.weight": _meta(hidden, ctx),
          "vector_in.in_layer.weight": _meta(hidden, vec),
          "double_blocks.0.img_attn.norm.key_norm.scale": _meta(128),
          "single_blocks.0.norm.key_norm.scale": _meta(128)}
    if guidance:
        sd["guidance_in.in_layer.weight"] = _meta(hidden, 256)
    return sd


def _chroma_skeleton(hidden, ctx):
    return {"img_in.weight": _meta(hidden, 64), "txt_in.weight": _meta(hidden, ctx),
            "double_blocks.0.img_attn.norm.key_norm.scale": _meta(128),
            "single_blocks.0.norm.key_norm.scale": _meta(128),
            "distilled_guidance_layer.norms.0.scale": _meta(5120)}


def _mmdit_skeleton(depth, adm, sd35, pos_max=32):
    h = 64 * depth
    sd = {"x_embedder.proj.weight": _meta(h, 16, 2, 2), "final_layer.linear.weight": _meta(2 * 2 * 16, h),
          "y_embedder.mlp.0.weight": _meta(h, adm), "context_embedder.weight": _meta(h, 4096),
          "pos_embed": _meta(1, pos_max * pos_max, h)}
    for i in range(depth):
        sd[f"joint_blocks.{i}.context_block.attn.qkv.weight"] = _meta(3 * h, h)
    if sd35:
        sd["joint_blocks.0.context_block.attn.ln_q.weight"] = _meta(64)
        sd["joint_blocks.0.x_block.attn2.qkv.weight"] = _meta(3 * h, h)
    return sd


def _lumina_skeleton(dim, cap):
    heads = {2304: 24}.get(dim, 32)
    return {"cap_embedder.1.weight": _meta(dim, cap), "x_embedder.weight": _meta(dim, 64),
            "noise_refiner.0.attention.k_norm.weight": _meta(dim // heads),
            "layers.0.attention.k_norm.weight": _meta(dim // heads)}


def _file_names(model_class_name: str, module) -> dict:
    """The host model's tensors under the published checkpoint's names: Flux and Chroma files name
    RMSNorm parameters `scale` (0.3.64's modules do too; 0.33's call them `weight` and rename on load)."""
    shapes = _shapes(module)
    if model_class_name not in ("Flux", "FluxSchnell", "Chroma"):
        return shapes
    rms = {n for n, m in module.named_modules() if "RMSNorm" in type(m).__name__}
    out = {}
    for k, v in shapes.items():
        mod, _, leaf = k.rpartition(".")
        if mod in rms and leaf == "weight":
            k = mod + ".scale"
        out[k] = v
    return out


def _detect(skeleton: dict):
    """What the running host builds from these tensors: (model_config, file layout) or (None, reason)."""
    import torch
    import comfy.model_detection as md

    unet_config = md.detect_unet_config(skeleton, "")
    if unet_config is None:
        return None, "detect_unet_config found no family"
    model_config = md.model_config_from_unet_config(unet_config, skeleton)
    if model_config is None:
        return None, f"no supported model matches {unet_config}"
    with torch.device("meta"):
        model = model_config.get_model(skeleton)
    layout = _file_names(type(model_config).__name__, model.diffusion_model)
    return model_config, layout


def _choose(candidates, expected_class: str):
    """The first candidate (skeleton builder, info) whose detected model has the skeleton's shapes."""
    reasons = []
    for skeleton, info in candidates:
        model_config, layout = _detect(skeleton)
        if model_config is None:
            reasons.append(f"{info}: {layout}")
            continue
        name = type(model_config).__name__
        bad = {k: (tuple(v.shape), layout.get(k)) for k, v in skeleton.items() if layout.get(k) != tuple(v.shape)}
        if name != expected_class or bad:
            reasons.append(f"{info}: detected {name}, shapes differ {bad}" if bad else f"{info}: detected {name}")
            continue
        # The whole file must come back as the same family with the same tensors.
        full = {k: _meta(*s) for k, s in layout.items()}
        again, layout2 = _detect(full)
        if again is None or type(again).__name__ != expected_class or layout2 != layout:
            reasons.append(f"{info}: the full layout is not detected back as {expected_class}")
            continue
        return info, layout
    raise FamilyUnsupported(f"this host ({_host_version()}) detects none of the layouts as {expected_class}: "
                            + "; ".join(reasons))


def _host_version() -> str:
    try:
        import comfyui_version

        return "ComfyUI " + comfyui_version.__version__
    except Exception:  # noqa: BLE001
        return "ComfyUI of unknown version"


# ------------------------------------------------------------------------------------- the families

def _flux(name: str, guidance: bool, seed: int) -> FamilyFiles:
    expected = "Flux" if guidance else "FluxSchnell"
    vec = CLIP_OVERRIDES["hidden_size"]  # clip_l's pooled output (not projected, FluxClipModel)
    candidates = [(_flux_skeleton(256, T5_SMALL["d_model"], vec, guidance), {"hidden": 256, "t5": T5_SMALL}),
                  (_flux_skeleton(3072, 4096, vec, guidance), {"hidden": 3072, "t5": T5_4096})]
    info, layout = _choose(candidates, expected)
    return FamilyFiles(
        name=name, model_class=expected,
        diffusion_model=_write(name, layout, seed),
        text_encoders=(clip_file("clip_l", seed), t5_file(info["t5"], seed)), clip_type="flux",
        vae=vae_file(seed),
        te_model_options={"model_config": dict(CLIP_OVERRIDES), "t5xxl_model_config": dict(info["t5"])},
        layout=info, expect={"image_model": "flux", "guidance_embed": guidance, "hidden_size": info["hidden"]})


def _sd3(name: str, sd35: bool, seed: int, depth: int = 2) -> FamilyFiles:
    """SD3's MMDiT is 64·depth wide with `depth` heads (the host reads the depth from the tensors)."""
    adm = 2 * CLIP_OVERRIDES["hidden_size"]  # pooled clip_l (unprojected) + clip_g (projected)
    info, layout = _choose([(_mmdit_skeleton(depth, adm, sd35), {"depth": depth, "hidden": 64 * depth,
                                                                  "heads": depth})], "SD3")
    return FamilyFiles(
        name=name, model_class="SD3",
        diffusion_model=_write(name, layout, seed),
        text_encoders=(clip_file("clip_l", seed), clip_file("clip_g", seed), t5_file(T5_4096, seed)),
        clip_type="sd3", vae=vae_file(seed),
        te_model_options={"model_config": dict(CLIP_OVERRIDES), "t5xxl_model_config": dict(T5_4096)},
        layout=info, expect={"depth": depth, "adm_in_channels": adm, "qk_norm": "rms" if sd35 else None,
                             "x_block_self_attn_layers": [0] if sd35 else []})


def _chroma(name: str, seed: int) -> FamilyFiles:
    candidates = []
    for t5 in T5_XXL_DETECTED:
        if _host_detects_t5xxl(t5):
            candidates.append((_chroma_skeleton(3072, t5["d_model"]), {"hidden": 3072, "t5": t5}))
    if not candidates:
        raise FamilyUnsupported("detect_te_model takes none of the reduced 24-block T5 layouts for T5-XXL")
    info, layout = _choose(candidates, "Chroma")
    return FamilyFiles(
        name=name, model_class="Chroma",
        diffusion_model=_write(name, layout, seed),
        text_encoders=(t5_file(info["t5"], seed),), clip_type="chroma", vae=vae_file(seed),
        te_model_options={"t5xxl_model_config": dict(info["t5"])}, layout=info,
        expect={"image_model": "chroma", "hidden_size": 3072, "context_in_dim": info["t5"]["d_model"]})


def _lumina2(name: str, seed: int) -> FamilyFiles:
    cap = GEMMA_OVERRIDES["hidden_size"]
    info, layout = _choose([(_lumina_skeleton(2304, cap), {"dim": 2304, "heads": 24, "kv_heads": 8})], "Lumina2")
    return FamilyFiles(
        name=name, model_class="Lumina2",
        diffusion_model=_write(name, layout, seed),
        text_encoders=(gemma_file(seed),), clip_type="lumina2", vae=vae_file(seed),
        te_model_options={"gemma2_2b_model_config": dict(GEMMA_OVERRIDES)}, layout=info,
        expect={"image_model": "lumina2", "dim": 2304, "cap_feat_dim": cap})


FAMILIES = {
    "flux_dev": lambda seed: _flux("flux_dev", True, seed),
    "flux_schnell": lambda seed: _flux("flux_schnell", False, seed),
    "sd3": lambda seed: _sd3("sd3", False, seed),
    "sd35": lambda seed: _sd3("sd35", True, seed),
    # for bench/ only: an SD3 big enough that a step is not all overhead (8 blocks, 512 wide, ~60 M parameters)
    "sd3_d8": lambda seed: _sd3("sd3_d8", False, seed, depth=8),
    "chroma": lambda seed: _chroma("chroma", seed),
    "lumina2": lambda seed: _lumina2("lumina2", seed),
}


def ensure_family(name: str, seed: int = SEED) -> FamilyFiles:
    """The family's files for the running host (written once). Raises FamilyUnsupported with the reason
    where the host detects none of the family's layouts."""
    return FAMILIES[name](seed)
