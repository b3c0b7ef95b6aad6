"""Tiny seeded Flux dev, Flux schnell, Chroma and SD3.5 (large and medium) checkpoints that Forge detects and
loads, and the test scaffolding that lets Forge build them small (test code, Forge's venv).

Each checkpoint has the real single-file layout, built from Forge's own classes (`backend.nn.flux` / `chroma` /
`mmditx`, `clip`, `t5`, `vae`), so the pinned `huggingface_guess` detects it:
- Flux and Chroma: `model.diffusion_model.*` in BFL's key names, `text_encoders.clip_l.*` /
  `text_encoders.t5xxl.*`, `vae.*` (Flux with `guidance_in`, FluxSchnell without it; Chroma as FluxSchnell,
  which Forge's loader turns into its Chroma engine by the `distilled_guidance_layer` keys);
- SD3.5: `model.diffusion_model.*` in Stability's MMDiT names (RMS q/k norms, as both SD3.5 models), the three
  text encoders under `text_encoders.clip_l|clip_g|t5xxl.` (as the all-in-one files; Forge's loader needs all
  three), `first_stage_model.*`. huggingface_guess reads the MMDiT's sizes off the weights (depth = width / 64,
  one 64-wide head per block), so no wrapper is needed: "sd35-large" has 2 joint blocks, "sd35-medium" 1 with
  the 384-patch position table by which Forge's MMDiT gives the first 13 x blocks medium's second attention
  (`attn2`; a 38 MB table, the price of that rule).
Two pieces of scaffolding keep Forge's build of them small; `scaffold(root)` puts both into a writable copy of
Forge:
- the pinned huggingface_guess (2024-08) writes Flux's full-size transformer config (hidden 3072, 19 + 38
  blocks) whatever the weights say: `tiny_guess()` wraps `huggingface_guess.guess` to put TINY_TRANSFORMER
  in (and Forge's `GuessChroma` extra config likewise). In a server it runs from a test-only extension;
- Forge builds the text encoders and the VAE from the configs in its `backend/huggingface/<repo>/` folders
  (T5-XXL alone is 4.7B parameters): `reduce_configs` replaces those config.json files in the copy by
  reduced ones (TINY_CONFIGS: CLIP-L and CLIP-G 32 wide, T5 32 wide with 2 layers, a VAE of 32 channels with
  the family's 16 latent channels, scale and shift). Tokenizers, scheduler and model_index stay Forge's own.
  SD3.5's conditioning pads CLIP to T5-XXL's 4096 channels, so its MMDiT takes 4096-wide context; with the
  reduced T5, Forge's "Enable T5" option (off by default) cannot be switched on. Forge's SD3 T5 tokenizer
  config sets `add_prefix_space`, which makes transformers rebuild the fast tokenizer from SentencePiece's
  model through protobuf; with Forge's pinned protobuf 3.20.0 and the sentencepiece ≥ 0.2.1 that
  open-clip-torch pulls in today, that import fails (ImportError: cannot import name 'runtime_version'), so
  Forge itself cannot load any SD3.5 checkpoint there (sentencepiece 0.2.0 loads it, with the same tokens).
  The copy's config leaves the flag out, and the tokenizer loads from its own tokenizer.json.

Run as a script (a fresh process, Forge's folder on sys.path): `python flow_checkpoint.py FORGE OUT_DIR`;
`ensure_checkpoints` does that once per version into the test cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

VERSION = "forge-tiny-flow-v2"
HERE = Path(__file__).resolve().parent
#: family -> (Forge's config folder, what the pinned huggingface_guess detects)
FAMILIES = {"flux": ("black-forest-labs/FLUX.1-dev", "Flux"),
            "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "FluxSchnell"),
            "chroma": ("Chroma", "FluxSchnell"),
            "sd35-large": ("stabilityai/stable-diffusion-3-medium-diffusers", "SD3"),
            "sd35-medium": ("stabilityai/stable-diffusion-3-medium-diffusers", "SD3")}
TINY_CONFIGS = {
    "CLIPTextModel": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                          projection_dim=32),
    "CLIPTextModelWithProjection": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_hidden_layers=2, projection_dim=32),
    "T5EncoderModel": dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2),
    "AutoencoderKL": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1),
}
TINY_TRANSFORMER = dict(in_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=2,
                        depth=1, depth_single_blocks=2, axes_dim=[4, 14, 14], theta=10000, qkv_bias=True)
TINY_CHROMA = dict(guidance_out_dim=64, guidance_hidden_dim=32, guidance_n_layers=2)
#: the tiny MMDiTs: joint blocks (64 wide each, as huggingface_guess reads depth) and the position table's side
TINY_MMDIT = {"sd35-large": dict(depth=2, pos_embed_max_size=32), "sd35-medium": dict(depth=1, pos_embed_max_size=384)}
GUESS_EXTENSION = "zz-test-tiny-flow-guess"


def tiny_configs(forge: Path, family: str) -> Dict[str, dict]:
    """component name (text_encoder, text_encoder_2, vae) -> its reduced config, from Forge's own."""
    folder = forge / "backend" / "huggingface" / FAMILIES[family][0]
    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for part, spec in index.items():
        if isinstance(spec, list) and spec[1] in TINY_CONFIGS:
            config = json.loads((folder / part / "config.json").read_text())
            out[part] = dict(config, **TINY_CONFIGS[spec[1]])
    return out


def reduce_configs(root: Path) -> None:
    """The text encoders' and VAE's configs of the families, reduced, and SD3's T5 tokenizer config without
    `add_prefix_space` (see the module docstring), in a writable copy of Forge."""
    for repo, family in {repo: family for family, (repo, _) in FAMILIES.items()}.items():  # each folder once
        for part, config in tiny_configs(root, family).items():
            path = root / "backend" / "huggingface" / repo / part / "config.json"
            _replace_json(path, config)
    t5_tokenizer = root / "backend" / "huggingface" / FAMILIES["sd35-large"][0] / "tokenizer_3" / "tokenizer_config.json"
    _replace_json(t5_tokenizer, {k: v for k, v in json.loads(t5_tokenizer.read_text()).items()
                                 if k != "add_prefix_space"})


def _replace_json(path: Path, data: dict) -> None:
    path.unlink()  # a copy of the read-only original: replace it, never write through it
    path.write_text(json.dumps(data, indent=1))


def tiny_guess() -> None:
    """huggingface_guess.guess with TINY_TRANSFORMER's sizes in its Flux config (see the module docstring)."""
    import huggingface_guess
    from backend import loader

    real = huggingface_guess.guess

    def guess(sd):
        result = real(sd)
        if type(result).__name__ in ("Flux", "FluxSchnell"):
            result.unet_config = dict(result.unet_config, **TINY_TRANSFORMER)
        return result

    if getattr(real, "tiny_flow", False):
        return
    guess.tiny_flow = True
    huggingface_guess.guess = guess
    if hasattr(loader, "GuessChroma"):
        loader.GuessChroma.unet_extra_config = dict(TINY_CHROMA)


def scaffold(root: Path) -> None:
    """A writable copy of Forge made to build the tiny checkpoints small: reduced configs, and a test-only
    extension that installs tiny_guess() when Forge loads its scripts (before any model loads)."""
    reduce_configs(root)
    scripts = root / "extensions" / GUESS_EXTENSION / "scripts"
    scripts.mkdir(parents=True)
    (scripts / "tiny_flow_guess.py").write_text(
        '"""Test scaffolding (tests/forge/flow_checkpoint.py): Forge detects the tiny Flux/Chroma checkpoints '
        'at their own size."""\n'
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom flow_checkpoint import tiny_guess\ntiny_guess()\n")


def build(forge: Path, family: str, seed: int = 0) -> dict:
    """The checkpoint's tensors (seeded, fp32), checked to be detected as FAMILIES says."""
    import huggingface_guess
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.nn.chroma import IntegratedChromaTransformer2DModel
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.mmditx import MMDiTX
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from sdxl_engine import _seeded

    torch.manual_seed(seed)
    configs = tiny_configs(forge, family)

    def clip(part):
        config = CLIPTextConfig(**{k: v for k, v in configs[part].items() if not k.startswith("_")})
        return IntegratedCLIP(CLIPTextModel, config, add_text_projection=family in TINY_MMDIT)

    vae = IntegratedAutoencoderKL.from_config({k: v for k, v in configs["vae"].items() if not k.startswith("_")})
    if family in TINY_MMDIT:
        depth, side = TINY_MMDIT[family]["depth"], TINY_MMDIT[family]["pos_embed_max_size"]
        width = 64 * depth
        pooled = 2 * configs["text_encoder"]["projection_dim"]  # CLIP-L's and CLIP-G's pooled outputs side by side
        mmdit = MMDiTX(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=depth,
                       adm_in_channels=pooled, num_patches=side * side, pos_embed_max_size=side, qk_norm="rms",
                       context_embedder_config={"target": "torch.nn.Linear",
                                                "params": {"in_features": 4096, "out_features": width}})
        parts = [("model.diffusion_model.", mmdit), ("text_encoders.clip_l.", clip("text_encoder")),
                 ("text_encoders.clip_g.", clip("text_encoder_2")),
                 ("text_encoders.t5xxl.", IntegratedT5(configs["text_encoder_3"])), ("first_stage_model.", vae)]
    elif family == "chroma":
        parts = [("model.diffusion_model.", IntegratedChromaTransformer2DModel(**TINY_TRANSFORMER, **TINY_CHROMA)),
                 ("text_encoders.t5xxl.", IntegratedT5(configs["text_encoder"])), ("vae.", vae)]
    else:
        flux = IntegratedFluxTransformer2DModel(**TINY_TRANSFORMER, guidance_embed=family == "flux")
        parts = [("model.diffusion_model.", flux), ("text_encoders.t5xxl.", IntegratedT5(configs["text_encoder_2"])),
                 ("vae.", vae), ("text_encoders.clip_l.", clip("text_encoder"))]
    sd = {}
    for prefix, module in parts:
        for k, v in _seeded(module.state_dict()).items():
            if k == "logit_scale" or k.endswith("position_ids"):  # not in released files
                continue
            sd[prefix + k] = v.float().contiguous()
    detected = type(huggingface_guess.guess(dict(sd))).__name__
    assert detected == FAMILIES[family][1], f"huggingface_guess detects {detected} for the tiny {family}"
    return sd


def cache_dir() -> Path:
    root = os.environ.get("DREAMBOOTH_TEST_CACHE") or os.path.join(__import__("tempfile").gettempdir(),
                                                                   "dreambooth-test-cache")
    text = VERSION + Path(__file__).read_text() + (HERE / "sdxl_engine.py").read_text()
    path = Path(root) / f"{VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_checkpoints(forge: Path) -> Dict[str, Path]:
    """family -> the tiny checkpoint, written once into the cache folder (by a fresh process: Forge's
    `backend` parses the command line and sets up its devices at import)."""
    folder = cache_dir()
    paths = {family: folder / f"tiny_{family.replace('-', '_')}.safetensors" for family in FAMILIES}
    if not all(p.is_file() for p in paths.values()):
        out = subprocess.run([sys.executable, __file__, str(forge), str(folder)], cwd=str(forge), capture_output=True,
                             text=True, timeout=900, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        if out.returncode != 0 or not all(p.is_file() for p in paths.values()):
            raise RuntimeError(f"building the tiny flow checkpoints failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return paths


def main(argv) -> None:
    from safetensors.torch import save_file

    forge, out = Path(argv[1]), Path(argv[2])
    for family in FAMILIES:
        path = out / f"tiny_{family.replace('-', '_')}.safetensors"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file(build(forge, family), str(tmp), metadata={"dreambooth_test": VERSION})
        os.replace(tmp, path)


if __name__ == "__main__":
    forge_dir = Path(sys.argv[1]).resolve()
    sys.path[:0] = [str(forge_dir), str(forge_dir / "packages_3rdparty"),
                    str(forge_dir / "repositories" / "huggingface_guess")]
    args = list(sys.argv)
    sys.argv = [sys.argv[0], "--always-cpu", "--all-in-fp32"]  # what backend.args reads at import
    main(args)
