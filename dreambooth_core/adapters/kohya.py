"""The LoRA file format, kohya's: which modules of a Stable Diffusion model carry a LoRA, the key each
one has in the file, writing and reading the file, and its metadata. One place for every backend: the diffusers backend names diffusers modules directly; the
ComfyUI and WebUI backends hold the original (ldm) layout and map its module paths to diffusers
paths first (`unet_diffusers_path`, or the host's own map), so all three write the same file, which
ComfyUI's LoraLoader, the WebUI's Lora support and diffusers read. What the file says about its
subject and base model is built in `metadata`.

ldm → diffusers, for a UNet with N res blocks per level (N + 1 input blocks per level):
  input_blocks.{1 + b(N+1) + j}.0 / .1 → down_blocks.{b}.resnets.{j} / attentions.{j};
  input_blocks.{(b+1)(N+1)}.0.op → down_blocks.{b}.downsamplers.0.conv;
  middle_block.0 / 1 / 2 → mid_block.resnets.0 / attentions.0 / resnets.1;
  output_blocks.{b(N+1) + j}.0 / .1 → up_blocks.{b}.resnets.{j} / attentions.{j};
  the last module of output_blocks.{b(N+1) + N} with a `conv` → up_blocks.{b}.upsamplers.0.conv.
Inside a transformer the names are the same in both layouts (`transformer_blocks.0.attn1.to_q`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from .. import fileio
from .base import LoRAError
from .lora import is_linear_like
from .metadata import OURS_KEY
from .network import LoRANetwork

# The Linears of a CLIP text encoder layer that carry LoRA (attention and MLP), by path in the layer.
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "mlp.fc1", "mlp.fc2")
# ldm resnet part → diffusers resnet part
_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
           "emb_layers.1": "time_emb_proj"}


def kohya_name(prefix: str, diffusers_path: str) -> str:
    """`lora_unet` + `down_blocks.0.attentions.0.proj_in` → `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return f"{prefix}_{diffusers_path.replace('.', '_')}"


def text_layer_name(prefix: str, index: int, rest: str) -> str:
    """The key of TEXT_TARGETS entry `rest` in text-encoder layer `index` (`lora_te`, or `lora_te1`/`lora_te2`
    for SDXL's two encoders)."""
    return kohya_name(prefix, f"text_model.encoder.layers.{index}.{rest}")


def is_unet_target(diffusers_path: str, conv: bool) -> bool:
    """Whether kohya's LoRA puts an adapter on this UNet module: everything inside the transformer
    blocks, and with `conv` (LoCon) the res-block, down- and up-sampler convolutions too."""
    marked = f".{diffusers_path}."
    if ".attentions." in marked:
        return True
    return conv and any(p in marked for p in (".resnets.", ".downsamplers.", ".upsamplers."))


def _resnet(rest: str) -> Optional[str]:
    return _RESNET.get(rest)


def unet_diffusers_path(path: str, per_level: int, output_is_attention: Optional[bool] = None) -> Optional[str]:
    """The diffusers path of the ldm UNet module `path` (relative to `diffusion_model`), or None
    where diffusers has no such module. `per_level` is N + 1; `output_is_attention` says whether the
    output block's sub-module `path` lies in is a transformer (else an upsampler is assumed)."""
    parts = path.split(".")
    head = parts[0]
    if head == "middle_block" and len(parts) > 2:
        idx, rest = int(parts[1]), ".".join(parts[2:])
        if idx == 1:
            return f"mid_block.attentions.0.{rest}"
        res = _resnet(rest)
        return f"mid_block.resnets.{idx // 2}.{res}" if res else None
    if head not in ("input_blocks", "output_blocks") or len(parts) < 4:
        return None
    i, sub, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
    if head == "input_blocks":
        if i == 0:
            return None
        b, j = divmod(i - 1, per_level)
        if j == per_level - 1:  # the downsampler of level b
            return f"down_blocks.{b}.downsamplers.0.conv" if rest == "op" else None
        if sub == 1:
            return f"down_blocks.{b}.attentions.{j}.{rest}"
        res = _resnet(rest)
        return f"down_blocks.{b}.resnets.{j}.{res}" if res else None
    b, j = divmod(i, per_level)
    if sub == 0:
        res = _resnet(rest)
        return f"up_blocks.{b}.resnets.{j}.{res}" if res else None
    if output_is_attention:
        return f"up_blocks.{b}.attentions.{j}.{rest}"
    return f"up_blocks.{b}.upsamplers.0.conv" if rest == "conv" else None


# kohya names of attention projections: the UNet's attn1/attn2 to_q/to_k/to_v/to_out.0, the CLIP text
# encoders' self_attn q/k/v/out_proj, and the flow transformers' fused projections: Flux/Chroma
# img/txt_attn qkv/proj and the single blocks' linear1/linear2 (attention fused with the MLP), SD3's
# attn/attn2 qkv/proj, Lumina 2's attention qkv/out (what `lora_targets="attention"` keeps).
ATTENTION_PROJECTION = re.compile(r"(_attn\d+_to_(q|k|v|out_0)|_self_attn_(q|k|v|out)_proj|_attn2?_(qkv|proj)"
                                  r"|_attention_(qkv|out)|^lora_unet_single_blocks_\d+_linear[12])$")
# kohya names inside the transformer blocks (what "attention" narrows): the UNet's attentions, the text
# encoders, and the blocks of the flow transformers
IN_TRANSFORMER = re.compile(r"_attentions_\d+_|^lora_te\d?_|^lora_unet_(double_blocks|single_blocks|joint_blocks"
                            r"|layers|noise_refiner|context_refiner)_\d+_")


#: the Linears of a Flux / Chroma transformer that carry a LoRA, by module path in BFL's layout (which
#: ComfyUI and Forge both hold): the double blocks' attention and MLP, the single blocks' fused linear1 /
#: linear2. The adaLN modulation Linears are left out: they are large, and a LoRA there mostly rescales
#: the whole image.
FLUX_BLOCK_LINEARS = re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
                                r"|single_blocks\.\d+\.linear[12])$")
#: the same for SD3 / SD3.5's MMDiT (Stability's layout, which ComfyUI and Forge both hold): each joint block's
#: context and x blocks, their attention (SD3.5 medium's second x attention `attn2` too) and MLP; no adaLN
#: modulation.
SD3_BLOCK_LINEARS = re.compile(r"^joint_blocks\.\d+\.(context|x)_block\.(attn2?\.(qkv|proj)|mlp\.fc[12])$")


def block_lora_targets(diffusion_model: nn.Module, rule: "re.Pattern[str]") -> Dict[str, nn.Module]:
    """kohya name (`lora_unet_` + the module path, dots as underscores: `lora_unet_double_blocks_0_img_attn_qkv`)
    → module, for the Linears of a flow transformer whose path matches `rule`. Every host's loader maps
    these names by its generic `lora_unet_` rule."""
    return {"lora_unet_" + path.replace(".", "_"): module for path, module in diffusion_model.named_modules()
            if rule.match(path) and is_linear_like(module)}


def webui_nameable(targets: Dict[str, torch.nn.Module]) -> Dict[str, torch.nn.Module]:
    """`targets` without the one LoCon module the Automatic1111 WebUI would put on another module.
    Its formula for `up_blocks_{b}_upsamplers_0_conv` assumes SD1's first up block, which has no
    attention (the upsampler is then module 1 of its output block, else module 2). In SDXL that
    block has attentions, so the name maps to a transformer and the key is left unloaded there;
    kohya's own SDXL files avoid it with ldm names, which diffusers' loader drops when they come
    mixed with diffusers names. Leaving that convolution out keeps every key loadable everywhere."""
    first_up_has_attention = any(name.startswith("lora_unet_up_blocks_0_attentions_") for name in targets)
    if not first_up_has_attention:
        return dict(targets)
    return {name: m for name, m in targets.items() if name != "lora_unet_up_blocks_0_upsamplers_0_conv"}


def select_lora_targets(targets: Dict[str, torch.nn.Module], scope: str) -> Dict[str, torch.nn.Module]:
    """The backend's kohya-named targets narrowed to `scope` (config.LORA_TARGETS). Filtering by
    name here, not in each backend, gives every host the same set and the same file keys.
    "attention" drops proj_in/proj_out and the feed-forward (and the text encoder's MLP) but keeps
    what `lora_conv` added: it narrows the transformer blocks only."""
    targets = webui_nameable(targets)
    if scope == "transformer":
        return dict(targets)
    if scope != "attention":
        raise ValueError(f"lora_targets {scope!r}: choose 'transformer' or 'attention'")
    return {name: module for name, module in targets.items()
            if not IN_TRANSFORMER.search(name) or ATTENTION_PROJECTION.search(name)}


# -- the file ------------------------------------------------------------------------------------

def save_lora(network: LoRANetwork, path: str | Path, metadata: Optional[Mapping[str, str]] = None,
              dtype: torch.dtype = torch.float16) -> Path:
    """Write the network's adapters with kohya's network metadata, then `metadata`."""
    meta = {"ss_network_module": "networks.lora", "format": "pt"}
    ranks = {a.rank for a in network.adapters.values()}
    alphas = {a.alpha for a in network.adapters.values()}
    if len(ranks) == 1:
        meta["ss_network_dim"] = str(ranks.pop())
    if len(alphas) == 1:
        meta["ss_network_alpha"] = f"{alphas.pop():g}"
    meta.update(metadata or {})
    fileio.save_tensors(path, network.state_dict(dtype), meta)
    return Path(path)


def check_replaceable(dest: str | Path) -> None:
    """A host publishes a LoRA under the user's save name: it may replace an earlier DreamBooth
    LoRA of that name (the file's metadata says so), never a file from elsewhere."""
    from safetensors import safe_open

    dest = Path(dest)
    if not dest.exists():
        return
    try:
        with safe_open(str(dest), framework="pt") as f:
            ours = OURS_KEY in (f.metadata() or {})
    except Exception:  # not a safetensors file at all: certainly not ours
        ours = False
    if not ours:
        raise LoRAError(f"save_name: {dest} exists and was not made by DreamBooth; choose another save_name so "
                        "it is not overwritten")


def read_lora_file(path: str | Path) -> tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoRAError(f"{path}: only .safetensors LoRA files are loaded (pickle files can run code)")
    if not path.is_file():
        raise LoRAError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as exc:  # safetensors raises several types for a broken file
        raise LoRAError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_lora(targets: Mapping[str, nn.Module], source: str | Path | Mapping[str, torch.Tensor],
              multiplier: float = 1.0) -> LoRANetwork:
    """Attach the adapters stored in a kohya-style file (or state dict) to matching targets."""
    state = read_lora_file(source)[0] if isinstance(source, (str, Path)) else dict(source)
    names = sorted({k.rsplit(".lora_down.weight", 1)[0] for k in state if k.endswith(".lora_down.weight")})
    if not names:
        raise LoRAError(f"{source}: no '<name>.lora_down.weight' keys; is this a kohya-style LoRA file?")
    unknown = [n for n in names if n not in targets]
    if unknown:
        raise LoRAError(f"{len(unknown)} LoRA modules do not exist in this model (e.g. {unknown[:3]}); "
                        "was the LoRA trained on another base model?")
    ranks = {n: state[f"{n}.lora_down.weight"].shape[0] for n in names}
    alphas = {n: float(state[f"{n}.alpha"]) if f"{n}.alpha" in state else float(ranks[n]) for n in names}
    network = LoRANetwork({n: targets[n] for n in names}, rank=1, ranks=ranks, alphas=alphas)
    network.load_state_dict(state)
    network.set_multiplier(multiplier)
    return network.attach()
