"""Which model families the ComfyUI backend trains, told from the MODEL the host loaded.

A family is named by the host's own detection: `type(model.model.model_config).__name__` (the
class in `comfy/supported_models.py` the loader matched) and its sampling object. Only the families
listed here train; every other one (video, audio, 3-D, inpainting and control variants with extra
input channels, EDM/x0 models, Stable Cascade's stage B, ...) is refused before any work, with
its name (and, where one is known, why: _WHY): none of them has been shown to train here (a tiny checkpoint
of its layout, trained inside the host; tests/integration).

A family is two choices (`Family.schedule`, `Family.transformer`):
  - its schedule: "discrete" (ε or v on the model's own ᾱ, read from its `model_sampling` sigmas) or
    "flow" (rectified flow with the model's shift: `CONST` sampling, or Cosmos Predict2's `COSMOS_RFLOW`, the
    same line in EDM-style coordinates that the backend converts to and from, cosmos_max_sigma);
  - its model path: the SD UNet (comfy_backend: the UNet's own LoRA names, its blocks checkpointed) or a
    transformer (flow_path: the blocks, LoRA and checkpointing below, predictions through the host's
    `extra_conds` and `_apply_model` pieces). The discrete-schedule transformers (PixArt α/Σ, Hunyuan-DiT)
    are the second path on the first schedule: their diffusion model returns only the ε / v channels of
    its learned-σ output, as the host's samplers read it. Stable Cascade's stage C (a convolutional UNet
    with attention, its own inputs through `extra_conds`) takes the same path: nothing in it is specific to
    transformers but the block rule, which for stage C lists its per-level blocks.

Per transformer family:
  - `shift`: the SD3-style time shift σ ↦ sσ/(1+(s−1)σ) the host samples with. `ModelSamplingFlux`
    stores μ of BFL's exponential shift e^μ/(e^μ + 1/t − 1), which is the same map with s = e^μ;
    `ModelSamplingDiscreteFlow` stores s itself.
  - `blocks`: the transformer block lists, run during training on copies of the residual stream they
    update in place (flow_path._install_flow) and checkpointed when the user asks for it. Empty: the
    generic rule, every top-level ModuleList of the diffusion model whose entries hold Linears.
  - `lora`: which Linears of the blocks carry a LoRA (attention and MLP; the adaLN modulation
    Linears are left out: they are large, and a LoRA there mostly rescales the whole image). None: the
    generic rule, every Linear inside the blocks (`blocks`, else the block lists) but under a path part
    naming modulation or a norm (`img_mod`, `modC`, `adaLN_modulation`, `norm1.linear`). A family whose row
    names neither (Qwen-Image, AuraFlow, HunyuanImage 2.1, Flux 2) or only its blocks (HiDream, Omnigen2)
    needs nothing but its row: the conditioning comes from the host's `extra_conds`.
  - `text_cap`: the longest prompt, in tokens of the long-context encoder (T5 / Gemma), that
    training encodes (kohya's defaults: 512 for Flux dev and Chroma, 256 for schnell, SD3, Lumina 2).
    Nothing is cut at 77 tokens; CLIP encoders keep their own 77-token window (`windows`: another
    encoder's own cap).
  - `extras`: what the host's text encoder returns beside the text and pooled vectors that its `extra_conds`
    reads (HiDream's Llama hidden states, every layer's, `conditioning_llama3`): one shape for every prompt
    (the host pads HiDream's to 128 tokens, which `text_cap` keeps).
  - `text_extras`: a second encoder's per-token output and its mask beside the context (Hunyuan-DiT's mT5),
    zero-padded as the context is and cut back to each prompt's length.
The LoRA keys are kohya's for these models (`lora_unet_` + the module path in the host's own layout
with dots as underscores: `lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_joint_blocks_0_x_block_attn_qkv`,
`lora_unet_layers_0_attention_qkv`, `lora_unet_transformer_blocks_0_attn_to_q`,
`lora_unet_double_layers_0_attn_w1q`), which the stock LoraLoader maps for every model
(`comfy.lora.model_lora_keys_unet`, the generic `lora_unet_` rule) in both host versions.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Tuple

from ..dreambooth_core.adapters.kohya import FLUX_BLOCK_LINEARS, SD3_BLOCK_LINEARS
from ..dreambooth_core.backends.base import UnsupportedModel


@dataclass(frozen=True)
class Family:
    name: str  # what Backend.family says and the LoRA metadata names (dreambooth_core.adapters.metadata.FAMILIES)
    schedule: str  # "discrete" (ε/v on the model's ᾱ) or "flow" (rectified flow)
    transformer: bool = True  # the transformer path (flow_path); False: the SD UNet path
    native_resolution: int = 1024
    blocks: Tuple[str, ...] = ()  # empty: the generic rule (transformer_block_lists)
    lora: Optional["re.Pattern[str]"] = None  # on the module path inside diffusion_model; None: the generic rule
    text_cap: int = 0
    sampling: str = "CONST"  # the host's sampling kind: CONST, or COSMOS_RFLOW (flow_path._host_noise_level)
    extras: Tuple[str, ...] = ()  # text-encoder outputs beside the text that go to the host's `extra_conds`
    # tokenizer key -> its own cap, under text_cap (Hunyuan-DiT's BERT: the 77 tokens it was trained on)
    windows: Tuple[Tuple[str, int], ...] = ()
    # entries of the host's encoding beside `cond` that reach extra_conds: a second encoder's output and
    # its mask, one length (Hunyuan-DiT's mT5)
    text_extras: Tuple[str, ...] = ()
    # pixels per latent cell where the host's own nodes use another than the VAE's (Stable Cascade's stage C:
    # 42, its StableCascade_EmptyLatentImage / StageC_VAEEncode `compression`, sizes floored as they floor
    # them); 0: the VAE's
    compression: int = 0

    @property
    def flow(self) -> bool:
        return self.schedule == "flow"


# Discrete-schedule UNets: the SD path (ε/v from the model's own ᾱ).
_UNET = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
         "KOALA_700M": "sdxl", "KOALA_1B": "sdxl"}

_CASCADE_LORA = re.compile(r"^(down|up)_blocks\.\d+\.\d+\.(attention\.attn\.(to_q|to_k|to_v|out_proj)|kv_mapper\.1"
                           r"|channelwise\.[04])$")

# Discrete-schedule transformers (the generic block and LoRA rules): PixArt's T5 caps at the length the
# model was trained on (`model_max_length`: 120 tokens for α, 300 for Σ); Hunyuan-DiT (v1.1 / v1.2,
# v-prediction) reads its BERT (77 tokens) as the context and its mT5 (256) beside it.
_DIT = {
    "PixArtAlpha": Family("pixart-alpha", "discrete", text_cap=120),
    "PixArtSigma": Family("pixart-sigma", "discrete", text_cap=300),
    "HunyuanDiT": Family("hunyuan-dit", "discrete", text_cap=256, windows=(("hydit_clip", 77),),
                         text_extras=("conditioning_mt5xl", "attention_mask_mt5xl")),
    # v1.0: the same model class and conditioning (its extra embedder also reads the size and style conditions,
    # which the host's extra_conds make), on its own β schedule (the host's sigmas)
    "HunyuanDiT1": Family("hunyuan-dit", "discrete", text_cap=256, windows=(("hydit_clip", 77),),
                          text_extras=("conditioning_mt5xl", "attention_mask_mt5xl")),
    # Stable Cascade's stage C (the text-conditional prior, ε on StableCascadeSampling: see comfy_backend's
    # schedule): a convolutional UNet of ResBlock / TimestepBlock / AttnBlock triples in per-level lists. Its
    # LoRA: the attention (q, k, v, out and the text's kv_mapper) and the MLPs (ResBlock's channelwise Linears);
    # the TimestepBlocks' mappers are its modulation and stay out. CLIP-G's 77 tokens.
    "Stable_Cascade_C": Family("stable-cascade-c", "discrete", blocks=("down_blocks", "up_blocks"),
                               lora=_CASCADE_LORA, compression=42),
}

# Flux, Chroma and SD3 share their LoRA rules with the WebUI side (dreambooth_core.adapters.kohya).
_LUMINA_LORA = re.compile(r"^(noise_refiner|context_refiner|layers)\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])$")
_FLOW = {
    "Flux": Family("flux", "flow", blocks=("double_blocks", "single_blocks"), lora=FLUX_BLOCK_LINEARS, text_cap=512),
    "FluxSchnell": Family("flux-schnell", "flow", blocks=("double_blocks", "single_blocks"), lora=FLUX_BLOCK_LINEARS,
                          text_cap=256),
    "SD3": Family("sd3", "flow", blocks=("joint_blocks",), lora=SD3_BLOCK_LINEARS, text_cap=256),
    "Chroma": Family("chroma", "flow", blocks=("double_blocks", "single_blocks"), lora=FLUX_BLOCK_LINEARS,
                     text_cap=512),
    # Chroma Radiance: Chroma's blocks on 16x16 pixel patches, then a per-pixel NeRF head whose MLP weights
    # are generated per patch from the blocks' output: no LoRA there, but its blocks are checkpointed too
    # (those generated weights are most of what a pixel-space step keeps for backward). Its "latents" are
    # the pixels in [-1, 1] (the host's pixel_space VAE, latent_factor 1).
    "ChromaRadiance": Family("chroma-radiance", "flow", blocks=("double_blocks", "single_blocks", "nerf_blocks"),
                             lora=FLUX_BLOCK_LINEARS, text_cap=512),
    "Lumina2": Family("lumina2", "flow", blocks=("noise_refiner", "context_refiner", "layers"), lora=_LUMINA_LORA,
                      text_cap=256),
    # The generic rule: the blocks are the transformer's block lists, the LoRA every Linear in them but
    # the modulation (musubi-tuner's Qwen-Image default: the Linears of QwenImageTransformerBlock, `*_mod`
    # left out: to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out, img_mlp / txt_mlp). 512 tokens: diffusers'
    # QwenImagePipeline max_sequence_length.
    "QwenImage": Family("qwen-image", "flow", text_cap=512),
    # AuraFlow: its Pile-T5 pads to 256 tokens (the host's min_length), what it was trained on.
    "AuraFlow": Family("auraflow", "flow", text_cap=256),
    # HunyuanImage 2.1 (double/single blocks as Flux; `img_mod`, `txt_mod`, `modulation` left out, as sd-scripts'
    # HunyuanImage LoRA): the Qwen2.5-VL encoder as Qwen-Image, so the same cap.
    "HunyuanImage21": Family("hunyuan-image", "flow", text_cap=512),
    # Flux 2 (0.33; its modulation is global, outside the blocks): 512 tokens, what the host pads its
    # Mistral / Qwen3 text to (model_base.Flux2.extra_conds).
    "Flux2": Family("flux2", "flow", text_cap=512),
    # Cosmos Predict2 text-to-image: the same straight line in the host's COSMOS_RFLOW coordinates (see
    # cosmos_max_sigma); its T5-XXL pads to 512 tokens (CosmosT5Tokenizer's min_length).
    "CosmosT2IPredict2": Family("cosmos-predict2", "flow", text_cap=512, sampling="COSMOS_RFLOW"),
    # Z-Image (ComfyUI 0.33): Lumina 2's NextDiT with its own modulation, so Lumina 2's blocks and Linears;
    # Qwen3-4B reads up to 512 tokens (diffusers' ZImagePipeline max_sequence_length).
    "ZImage": Family("z-image", "flow", blocks=("noise_refiner", "context_refiner", "layers"), lora=_LUMINA_LORA,
                     text_cap=512),
    # HiDream: its double and single stream blocks (not `caption_projection`, the text's input projections, a list
    # too); the MoE experts' Linears carry LoRAs, the gates are no Linears. T5 and Llama read 128 tokens (the host's
    # padding, diffusers' HiDreamImagePipeline max_sequence_length); the Llama hidden states reach `extra_conds`
    # as the host's conditioning carries them (flow_path._encode_flow).
    "HiDream": Family("hidream", "flow", blocks=("double_stream_blocks", "single_stream_blocks"), text_cap=128,
                      extras=("conditioning_llama3",)),
    # Omnigen2: text-to-image runs the noise and context refiners and the layers; `ref_image_refiner` reads
    # only reference images, so it is left out. Its Qwen2.5-VL-3B reads up to 256 tokens, the chat template
    # included (OmniGen2Pipeline's max_sequence_length).
    "Omnigen2": Family("omnigen2", "flow", blocks=("noise_refiner", "context_refiner", "layers"), text_cap=256),
}

TRAINS = ("SD1.x, SD2.x, SDXL, Flux (dev, schnell), Flux 2, SD3/SD3.5, Chroma, Chroma Radiance, Lumina 2, Z-Image, "
          "Cosmos Predict2 (text-to-image), Qwen-Image, AuraFlow, HunyuanImage 2.1, HiDream, Omnigen2, PixArt α/Σ, "
          "Hunyuan-DiT and Stable Cascade stage C")
# Why a refused family does not train, where it is more than "not shown yet".
_WHY = {
    "Stable_Cascade_B": "Stable Cascade's stage B is its decoder stage (stage C's latents to stage A's), not a "
                        "text-to-image model: train stage C, the prior (its checkpoint through Load Checkpoint), "
                        "and decode with the stage B and stage A you sample with",
}


def model_class(model) -> str:
    return type(model.model.model_config).__name__


def _sampling_kind(model_sampling) -> str:
    import comfy.model_sampling as ms

    for kind in ("CONST", "V_PREDICTION", "EPS", "EDM", "X0", "IMG_TO_IMG", "COSMOS_RFLOW"):
        cls = getattr(ms, kind, None)
        if cls is not None and isinstance(model_sampling, cls):
            return kind
    return type(model_sampling).__name__


def detect(model) -> Family:
    """The family of a ComfyUI MODEL, or UnsupportedModel naming what it is and what trains."""
    import comfy.model_sampling as ms

    name = model_class(model)
    sampling = model.get_model_object("model_sampling")
    kind = _sampling_kind(sampling)
    if name in _UNET:
        return Family(_UNET[name], "discrete", transformer=False)
    if name in _DIT:
        return _DIT[name]  # its sampling is checked with the UNets' (comfy_backend._prediction_type)
    family = _FLOW.get(name)
    if family is None:
        raise UnsupportedModel(
            f"the connected MODEL is {name} ({kind} sampling); DreamBooth trains {TRAINS}. Load one of those "
            "(video, audio, inpainting/control and other families are not supported)"
            + (f". {_WHY[name]}" if name in _WHY else ""))
    if family.sampling == "COSMOS_RFLOW":
        flow_classes = (ms.ModelSamplingCosmosRFlow,)
    else:
        flow_classes = tuple(c for c in (getattr(ms, "ModelSamplingDiscreteFlow", None),
                                         getattr(ms, "ModelSamplingFlux", None)) if c is not None)
    if kind != family.sampling or not isinstance(sampling, flow_classes):
        raise UnsupportedModel(
            f"the connected {name} MODEL samples with {type(sampling).__mro__[1].__name__} ({kind}), not its "
            f"rectified flow ({family.sampling}): a node patched its sampling (e.g. ModelSamplingDiscrete); "
            "connect the model without that patch")
    if float(getattr(sampling, "noise_scale", 1.0)) != 1.0:
        raise UnsupportedModel(f"the connected {name} MODEL scales its noise by {sampling.noise_scale}; DreamBooth "
                               "trains flow models with unit noise only")
    dm = model.model.diffusion_model
    if getattr(dm, "in_channels", None) is not None and getattr(dm, "out_channels", None) is not None \
            and name in ("Flux", "FluxSchnell", "Chroma") and dm.in_channels != dm.out_channels:
        raise UnsupportedModel(f"the connected {name} MODEL takes {dm.in_channels} input channels for "
                               f"{dm.out_channels} output channels (a Fill/inpainting or Canny/Depth model); "
                               f"DreamBooth trains the text-to-image models: {TRAINS}")
    return family


def flow_shift(model_sampling) -> float:
    """The SD3-style shift s of the host's flow sampling (see the module docstring); 1 for Cosmos RFlow,
    whose σ range alone says where it samples (cosmos_max_sigma)."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.ModelSamplingFlux):
        return math.exp(float(model_sampling.shift))
    if isinstance(model_sampling, getattr(ms, "ModelSamplingCosmosRFlow", ())):
        return 1.0
    return float(model_sampling.shift)


def cosmos_max_sigma(model_sampling) -> Optional[float]:
    """The noisiest point of the line a COSMOS_RFLOW model samples from, None for the other flow samplings.
    COSMOS_RFLOW is rectified flow in EDM-style coordinates: at the host's σ_e the model reads
    `calculate_input` (x0 + σ_e·ε)·(1 − σ) = (1 − σ)·x0 + σ·ε with σ = σ_e/(1 + σ_e) (also its time
    input, `timestep`), and `calculate_denoised` x0 = that input − σ·output makes the output the velocity
    ε − x0: the core's FlowSchedule at σ, up to σ_max/(1 + σ_max) (80/81 for sigma_max 80)."""
    import comfy.model_sampling as ms

    if not isinstance(model_sampling, getattr(ms, "ModelSamplingCosmosRFlow", ())):
        return None
    top = float(model_sampling.sigma_max)
    return top / (1 + top)


# The generic rule's exclusions: a path part naming modulation (adaLN, `img_mod`, `modC`) or a norm
# (a norm's own Linear, as Lumina's `adaLN`-style `norm1.linear`).
_NOT_LORA = re.compile(r"(?i)mod|norm|adaln")


def transformer_block_lists(diffusion_model) -> Tuple[str, ...]:
    """The generic rule's blocks: the diffusion model's top-level ModuleLists whose every entry holds a
    Linear (its transformer blocks; not embedders or final layers, which are single modules)."""
    from torch import nn

    out = []
    for name, child in diffusion_model.named_children():
        if isinstance(child, nn.ModuleList) and len(child) and all(
                any(isinstance(m, nn.Linear) for m in block.modules()) for block in child):
            out.append(name)
    return tuple(out)


def _lora_rule(family: Family, diffusion_model):
    if family.lora is not None:
        return family.lora.match
    lists = family.blocks or transformer_block_lists(diffusion_model)

    def generic(path: str) -> bool:
        parts = path.split(".")
        return (len(parts) > 2 and parts[0] in lists and parts[1].isdigit()
                and not any(_NOT_LORA.search(p) for p in parts[2:]))

    return generic


def flow_lora_targets(family: Family, diffusion_model):
    """kohya name -> (weight key in the ModelPatcher, module) for the family's LoRA Linears."""
    from torch import nn

    rule = _lora_rule(family, diffusion_model)
    out = {}
    for path, module in diffusion_model.named_modules():
        if isinstance(module, nn.Linear) and rule(path):
            out["lora_unet_" + path.replace(".", "_")] = (f"diffusion_model.{path}.weight", module)
    return out


def flow_blocks(family: Family, diffusion_model) -> list:
    """The blocks of the family's lists; a list of lists (Stable Cascade's levels) gives its entries' blocks."""
    from torch import nn

    out = []
    for name in family.blocks or transformer_block_lists(diffusion_model):
        for block in getattr(diffusion_model, name, None) or []:
            out.extend(block if isinstance(block, nn.ModuleList) else [block])
    return out
