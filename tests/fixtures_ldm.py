"""Test fixtures for single-file checkpoints: diffusers -> original (ldm) key layout, and builders.

This is test code: the production loader converts ldm -> diffusers with diffusers' own converter;
here we go the other way, so that a file in the layout that ComfyUI / Automatic1111 users keep can
be written from diffusers models whose weights we know, and the loaded result compared with them.

Layout facts used (as in the original CompVis / Stability repos):
  UNet  model.diffusion_model.  input_blocks.{n}.{0: resnet | 1: transformer}, op = downsampler;
        middle_block.{0,1,2}; output_blocks.{n}.{0: resnet | 1: transformer | 1 or 2: upsampler};
        resnet: in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection;
        time_embed.0/2, label_emb.0.0/2 (SDXL), out.0/2.
  VAE   first_stage_model.  encoder.down.{i}.block.{j}, decoder.up.{n-1-i}.block.{j} (reversed),
        mid.block_1/attn_1/block_2, nin_shortcut, norm_out; attention q/k/v/proj_out are 1x1 convs.
  CLIP  cond_stage_model.transformer.text_model.* (SD1) / conditioner.embedders.0.transformer.* (SDXL).
  OpenCLIP  cond_stage_model.model.* (SD2, 24 resblocks, the last unused) /
        conditioner.embedders.1.model.* (SDXL): token_embedding, positional_embedding,
        transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj},
        ln_final, text_projection (= the diffusers projection weight transposed), logit_scale.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Dict, Iterable, Mapping

import torch

from dreambooth_core.backends.single_file import CONFIGS_DIR

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
SD2_V_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _RESNET[head] + "." + tail


def unet_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> Dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in the ldm layout (with the model.diffusion_model. prefix)."""
    per = config["layers_per_block"] + 1
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: Dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        module, _, leaf = key.rpartition(".")
        p = key.split(".")
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{leaf}"
        elif p[0] == "down_blocks":
            b = int(p[1])
            if p[2] == "downsamplers":
                new = f"input_blocks.{1 + b * per + per - 1}.0.op.{leaf}"
            else:
                n = 1 + b * per + int(p[3])
                rest = ".".join(p[4:])
                new = f"input_blocks.{n}.0.{_resnet(rest)}" if p[2] == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif p[0] == "mid_block":
            idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
            rest = ".".join(p[3:])
            new = f"middle_block.{idx}.{_resnet(rest) if p[1] == 'resnets' else rest}"
        elif p[0] == "up_blocks":
            b = int(p[1])
            if p[2] == "upsamplers":
                new = f"output_blocks.{b * per + per - 1}.{2 if up_attn[b] else 1}.conv.{leaf}"
            else:
                n = b * per + int(p[3])
                rest = ".".join(p[4:])
                new = f"output_blocks.{n}.0.{_resnet(rest)}" if p[2] == "resnets" else f"output_blocks.{n}.1.{rest}"
        else:
            raise KeyError(f"unexpected UNet key {key}")
        out[UNET + new] = t
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> Dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the ldm layout (first_stage_model. prefix, 1x1-conv attention)."""
    n_up = len(config["up_block_types"])
    out: Dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        p = key.split(".")
        new = key.replace("conv_norm_out", "norm_out")
        if p[1] == "down_blocks":
            i = p[2]
            if p[3] == "downsamplers":
                new = f"encoder.down.{i}.downsample.conv.{p[-1]}"
            else:
                new = f"encoder.down.{i}.block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "up_blocks":
            i = n_up - 1 - int(p[2])
            if p[3] == "upsamplers":
                new = f"decoder.up.{i}.upsample.conv.{p[-1]}"
            else:
                new = f"decoder.up.{i}.block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{p[0]}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            else:
                rest = ".".join(p[4:])
                for d, ldm in _VAE_ATTN.items():
                    if rest.startswith(d + "."):
                        rest = ldm + rest[len(d):]
                        break
                new = f"{p[0]}.mid.attn_1.{rest}"
                if t.ndim == 2:
                    t = t[:, :, None, None]
        out[VAE + new] = t
    return out


def clip_to_ldm(sd: Mapping[str, torch.Tensor], prefix: str = SD1_TE) -> Dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict in the ldm layout (prefix + 'text_model.' + key)."""
    out = {prefix + "text_model." + k.removeprefix("text_model."): t for k, t in sd.items()}
    n_pos = sd[[k for k in sd if k.endswith("position_embedding.weight")][0]].shape[0]
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
    return out


def openclip_to_ldm(sd: Mapping[str, torch.Tensor], prefix: str, *, unused_last_layer: bool = False,
                    seed: int = 0) -> Dict[str, torch.Tensor]:
    """A CLIPTextModel(WithProjection) state dict in OpenCLIP's layout.

    `unused_last_layer` adds what SD2 files carry and SD2 does not use (SD2 takes the penultimate
    layer, so diffusers' 23-layer config drops the 24th resblock and the text projection).
    """
    sd = {k.removeprefix("text_model."): t for k, t in sd.items()}
    out: Dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    simple = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for d, ldm in simple.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{ldm}.{leaf}"] = sd[f"{src}{d}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{leaf}"] for q in "qkv"])
    out[prefix + "token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = sd["embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = sd["final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = sd["final_layer_norm.bias"]
    width = sd["final_layer_norm.weight"].shape[0]
    dtype = sd["final_layer_norm.weight"].dtype
    g = torch.Generator().manual_seed(seed)
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    if unused_last_layer:
        last = f"{prefix}transformer.resblocks.{layers[-1]}."
        extra = f"{prefix}transformer.resblocks.{layers[-1] + 1}."
        for k in [k for k in out if k.startswith(last)]:
            out[extra + k[len(last):]] = (torch.randn(out[k].shape, generator=g) * 0.02).to(dtype)
        out.setdefault(prefix + "text_projection", (torch.randn(width, width, generator=g) * 0.02).to(dtype))
    out[prefix + "logit_scale"] = torch.tensor(4.6052, dtype=dtype)
    return out


# --------------------------------------------------------------------------------------------
# seeded weights for configs, without running any module's init


def seeded_state_dict(model: torch.nn.Module, dtype=torch.float32, scale: float = 0.05,
                      seed: int = 0) -> Dict[str, torch.Tensor]:
    """Seeded random values for every parameter of `model` (which may live on the meta device).

    Each tensor has its own seed (from its name), so one can be regenerated alone with `seeded_tensor`.
    """
    return {name: seeded_tensor(name, tuple(p.shape), dtype, scale, seed) for name, p in model.state_dict().items()}


def seeded_tensor(name: str, shape, dtype=torch.float32, scale: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)
    t = torch.randn(shape, generator=g)
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "layer_norm1.weight",
                      "layer_norm2.weight", "final_layer_norm.weight", "norm_out.weight")):
        t = 1.0 + scale * t  # keep norms near identity so forward passes stay finite
    else:
        t = scale * t
    return t.to(dtype)


# --------------------------------------------------------------------------------------------
# reduced architectures (real key layout, tiny widths), with their own config folders

TE = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
          max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4, sample_size=16)
UNET_SD = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               norm_num_groups=8, cross_attention_dim=32)
REDUCED = {
    "sd1": dict(unet=dict(UNET_SD, attention_head_dim=4, use_linear_projection=False),
                text_encoder=dict(TE, hidden_act="quick_gelu", pad_token_id=49407, projection_dim=32)),
    "sd2": dict(unet=dict(UNET_SD, attention_head_dim=[2, 4, 4], use_linear_projection=True),
                text_encoder=dict(TE, hidden_act="gelu", pad_token_id=0, projection_dim=16)),
    "sdxl": dict(unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                           block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=[1, 2],
                           attention_head_dim=[2, 4], norm_num_groups=8, cross_attention_dim=32 + 48,
                           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=6 * 8 + 40),
                 text_encoder=dict(TE, hidden_act="quick_gelu", pad_token_id=49407, projection_dim=32),
                 # the two text encoders must differ in width, as in SDXL (768 / 1280): diffusers tells them
                 # apart by their position-embedding width
                 text_encoder_2=dict(TE, hidden_size=48, intermediate_size=96, hidden_act="gelu", pad_token_id=0,
                                     projection_dim=40)),
}
SHIPPED_FOR = {"sd1": "sd1", "sd2": "sd2-base", "sdxl": "sdxl"}


def build_reduced(arch: str, seed: int = 0):
    """Seeded diffusers components of a reduced `arch` model: {'unet', 'vae', 'text_encoder'[, 'text_encoder_2']}."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = REDUCED[arch]
    torch.manual_seed(seed)
    models = {"unet": UNet2DConditionModel(**spec["unet"]), "vae": AutoencoderKL(**VAE_CONFIG),
              "text_encoder": CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))}
    if "text_encoder_2" in spec:
        models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"]))
    for m in models.values():
        # init leaves many tensors at exactly 0/1 (biases, norms); give every tensor distinct values so
        # that a tensor loaded into the wrong place cannot go unnoticed
        m.load_state_dict(seeded_state_dict(m, seed=seed), strict=True)
        m.eval()
    return models


def write_config_dir(folder: Path, arch: str, models: Mapping[str, torch.nn.Module]) -> Path:
    """A diffusers config folder for `models` (no weights), with the shipped model_index/scheduler/tokenizer configs."""
    folder = Path(folder)
    shipped = CONFIGS_DIR / SHIPPED_FOR[arch]
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped / "model_index.json", folder / "model_index.json")
    for sub in ("scheduler", "tokenizer", "tokenizer_2"):
        if (shipped / sub).is_dir():
            shutil.copytree(shipped / sub, folder / sub, dirs_exist_ok=True)
    for name, m in models.items():
        (folder / name).mkdir(exist_ok=True)
        if name in ("unet", "vae"):
            m.save_config(folder / name)
        else:
            m.config.save_pretrained(folder / name)
    return folder


def to_ldm(arch: str, state_dicts: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Mapping],
           seed: int = 0) -> Dict[str, torch.Tensor]:
    """One ldm-layout checkpoint dict from diffusers component state dicts (keys: unet, vae, text_encoder[_2])."""
    out = unet_to_ldm(state_dicts["unet"], configs["unet"])
    out.update(vae_to_ldm(state_dicts["vae"], configs["vae"]))
    if arch == "sd1":
        out.update(clip_to_ldm(state_dicts["text_encoder"], SD1_TE))
    elif arch == "sd2":
        out.update(openclip_to_ldm(state_dicts["text_encoder"], SD2_TE, unused_last_layer=True, seed=seed))
    else:
        out.update(clip_to_ldm(state_dicts["text_encoder"], SDXL_TE1))
        out.update(openclip_to_ldm(state_dicts["text_encoder_2"], SDXL_TE2, seed=seed))
    return out


def reduced_checkpoint(tmp: Path, arch: str, seed: int = 0):
    """(models, config_dir, ldm_state_dict) for a reduced `arch` model; write the dict with `save`."""
    models = build_reduced(arch, seed)
    config_dir = write_config_dir(Path(tmp) / f"{arch}-config", arch, models)
    configs = {k: dict(m.config) for k, m in models.items() if k in ("unet", "vae")}
    ldm = to_ldm(arch, {k: m.state_dict() for k, m in models.items()}, configs, seed)
    return models, config_dir, ldm


def save(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    return Path(path)


# --------------------------------------------------------------------------------------------
# files with only the few keys that detection reads


def shape_file(path: Path, shapes: Mapping[str, Iterable[int]],
               values: Mapping[str, torch.Tensor] | None = None) -> Path:
    """A safetensors file with zero uint8 tensors of the given shapes (detection reads only shapes),
    plus real float tensors in `values`."""
    tensors = {k: torch.zeros(tuple(s), dtype=torch.uint8) for k, s in shapes.items()}
    tensors.update(values or {})
    return save(path, tensors)


def detection_shapes(arch: str) -> Dict[str, tuple]:
    """The real names and shapes of the keys that tell the families apart (plus one VAE key)."""
    common = {UNET + "input_blocks.0.0.weight": (320, 4, 3, 3), VAE + "quant_conv.weight": (8, 8, 1, 1)}
    if arch == "sd1":
        return {**common, UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                SD1_TE + "text_model.final_layer_norm.bias": (768,)}
    if arch == "sd2":
        return {**common, UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                SD2_TE + "ln_final.bias": (1024,)}
    if arch == "sdxl":
        return {**common, UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
                UNET + "label_emb.0.0.weight": (1280, 1),  # real: (1280, 2816); only its presence is read
                SDXL_TE1 + "text_model.final_layer_norm.bias": (768,), SDXL_TE2 + "ln_final.bias": (1280,)}
    raise KeyError(arch)


def json_dump(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj))
