"""Forge's flow-matching engines (Flux dev and schnell, Chroma, SD3.5): what ForgeBackend does differently for them.

How Forge samples these (read from its source; tests/forge/flow_engine.py checks each point on Forge's own
engines):
- The engine's `KModel.predictor` is a rectified flow (prediction type 'const'): `PredictionFlux` for Flux and
  Chroma, `PredictionDiscreteFlow` for SD3.5. The transformer's input is x itself, the noisy latent is
  (1 − σ)·x0 + σ·ε (`noise_scaling`) and the denoised one x − σ·out. So the transformer's output is the
  velocity ε − x0: dreambooth_core's FlowSchedule, whose timesteps are σ; the transformer's time input is
  `predictor.timestep(σ)` (σ for Flux, whose time embedding multiplies by 1000; 1000·σ for SD3.5). The shift
  is the predictor's: both σ grids are the core's `shift_sigmas` of t = k/N (Flux: s = e^μ, μ = 1.15 for dev at
  Forge's fixed 4096-token length, 1.0 for schnell and Chroma; SD3.5: Forge's fixed 3.0); `flow_shift` reads
  s off the grid.
- `get_learned_conditioning` gives a dict: Flux's T5 `crossattn` (Forge pads it to 256 tokens), CLIP-L's
  pooled `vector` (the transformer's `y`) and, for dev, the distilled `guidance` (Forge's Distilled CFG
  default, 3.5, as kohya trains); Chroma gets T5's output alone, at the prompt's own length. SD3.5's
  `crossattn` is CLIP-L and CLIP-G side by side (77-token chunks, zero-padded to T5's 4096 channels) followed
  by T5's tokens (256 or more; zeros while Forge's "Enable T5" option is off, its default), its `vector` the
  two pooled CLIP outputs. `predict` calls the transformer as `KModel.apply_model` does (its
  `calculate_input` and `timestep`, the computation dtype), without the final `calculate_denoised`.
- Captions are cached one at a time and batched by the core: each is zero-padded to TEXT_CAP positions with
  its real length beside it (`context_len`), and `predict` runs each length apart, on exactly the tokens
  Forge would give the transformer for that prompt.
- The blocks add to their streams out of place (`img = img + ...`, `x = x + ...`), so autograd needs no
  copies of them.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

from dreambooth_core.adapters.kohya import FLUX_BLOCK_LINEARS, SD3_BLOCK_LINEARS, block_lora_targets
from dreambooth_core.backends.base import UnsupportedModel
from dreambooth_core.training.schedules import shift_sigmas

from .common import owned

log = logging.getLogger("dreambooth")


@dataclass(frozen=True)
class FlowEngine:
    """What differs between Forge's flow engines."""
    name: str  # what messages call it
    predictor: str  # the k-diffusion predictor class Forge samples it with
    tokenizers: Tuple[str, ...]  # where the identifier is checked
    blocks: Tuple[str, ...]  # the transformer's block lists (gradient checkpointing's units)
    lora: "re.Pattern[str]"  # the core's rule for the Linears that carry a LoRA


_FLUX_BLOCKS = ("double_blocks", "single_blocks")
#: engine class -> its row. The identifier is checked in CLIP-L (Flux, SD3.5: T5's SentencePiece splits the
#: usual rare identifiers, "sks" in several pieces; Chroma has T5 only).
FLOW_ENGINES = {
    "Flux": FlowEngine("Flux", "PredictionFlux", ("clip_l",), _FLUX_BLOCKS, FLUX_BLOCK_LINEARS),
    "Chroma": FlowEngine("Chroma", "PredictionFlux", ("t5xxl",), _FLUX_BLOCKS, FLUX_BLOCK_LINEARS),
    "StableDiffusion3": FlowEngine("SD3.5", "PredictionDiscreteFlow", ("clip_l", "clip_g"), ("joint_blocks",),
                                   SD3_BLOCK_LINEARS),
}
#: class-image sampling where a request leaves it open (jobs.apply_class_sampling): Forge's Flux preset (CFG 1: dev's
#: guidance is distilled, Distilled CFG keeps Forge's 3.5; Euler, Simple schedule); Chroma keeps the CFG. Forge has
#: no SD3.5 preset: Stability's reference sampling for SD3.5 large (sd3_infer.py: CFG 4.5, DPM++ 2M on evenly
#: spaced timesteps of the model's σ grid, as Forge's Simple schedule; medium's CFG 5.0 is close).
CLASS_SAMPLING = {"flux": {"class_guidance": 1.0, "class_sampler": "Euler:Simple"},
                  "flux-schnell": {"class_guidance": 1.0, "class_sampler": "Euler:Simple"},
                  "chroma": {"class_sampler": "Euler:Simple"},
                  "sd3": {"class_guidance": 4.5, "class_sampler": "DPM++ 2M:Simple"}}
#: text positions a training caption keeps: Flux's and Chroma's T5 tokens (kohya's limit for Flux dev and Chroma;
#: Forge pads Flux's to 256); SD3.5's CLIP chunks of 77 and T5's 256 positions after them (three chunks fit)
TEXT_CAP = 512


def flow_family(sd_model) -> str:
    """'flux' (dev: Forge passes the distilled guidance), 'flux-schnell', 'chroma' or 'sd3' (the LoRA metadata's
    family names)."""
    kind = type(sd_model).__name__
    if kind == "Chroma":
        return "chroma"
    if kind == "StableDiffusion3":
        return "sd3"
    return "flux" if getattr(sd_model, "use_distilled_cfg_scale", False) else "flux-schnell"


def flow_shift(predictor, engine: FlowEngine) -> float:
    """The SD3-style shift s of the σ grid Forge samples on, or UnsupportedModel for any other sampling.
    Read from the grid itself (the predictor's `sigmas` at t = k/N), not from a field: Forge stores Flux's as
    log(s) in `mu` and SD3.5's as `shift`, Forge Neo Flux's as `shift`, and either may re-shift the grid at run
    time."""
    if type(predictor).__name__ != engine.predictor or getattr(predictor, "prediction_type", None) != "const":
        raise UnsupportedModel(f"the loaded {engine.name} model samples with {type(predictor).__name__} "
                               f"({getattr(predictor, 'prediction_type', None)}); DreamBooth trains it on Forge's "
                               f"rectified-flow sampling ({engine.predictor}) only")
    sigmas = predictor.sigmas.detach().to("cpu", torch.float64)
    t = torch.arange(1, len(sigmas) + 1, dtype=torch.float64) / len(sigmas)
    mid = len(sigmas) // 2
    shift = float(sigmas[mid] * (1 - t[mid]) / (t[mid] * (1 - sigmas[mid])))
    if not torch.allclose(shift_sigmas(t, shift), sigmas, atol=1e-5):
        raise UnsupportedModel(f"the loaded {engine.name} model samples on a σ grid that is no shifted rectified "
                               f"flow; DreamBooth trains it on Forge's own {engine.predictor} schedule")
    return shift


def flow_conditioning(cond) -> Dict[str, torch.Tensor]:
    """The core's conditioning from the engine's: `context` (zero-padded to TEXT_CAP positions), `context_len`
    (its real length), and for Flux and SD3.5 `vector` (the pooled CLIP output(s)) and, for Flux dev,
    `guidance`."""
    parts = cond if isinstance(cond, dict) else {"crossattn": cond}
    text = owned(parts["crossattn"]).float()
    n = text.shape[1]
    if n > TEXT_CAP:
        log.warning("DreamBooth: a caption has %d text positions; training uses the first %d", n, TEXT_CAP)
        n = TEXT_CAP
    out = {"context": text.new_zeros((text.shape[0], TEXT_CAP, text.shape[2])),
           "context_len": torch.full((text.shape[0],), n, dtype=torch.long)}
    out["context"][:, :n] = text[:, :n]
    for key in ("vector", "guidance"):
        if key in parts:
            out[key] = owned(parts[key]).float().reshape(text.shape[0], -1)
    return out


def predict_velocity(kmodel, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Dict[str, torch.Tensor],
                     device: torch.device) -> torch.Tensor:
    """The transformer's raw output (the velocity) at σ, called as `KModel.apply_model` calls it; the
    samples of each text length run together."""
    predictor, dtype = kmodel.predictor, kmodel.computation_dtype
    x = noisy.to(device, torch.float32)
    sigma = sigmas.to(device, torch.float32).reshape(-1)
    lengths = cond["context_len"].tolist()
    pieces, order = [], []
    for n in sorted(set(lengths)):
        group = [i for i, length in enumerate(lengths) if length == n]
        idx = torch.tensor(group, device=device)
        extra = {key: cond[key][group].to(device, dtype) for key in ("vector", "guidance") if key in cond}
        if "vector" in extra:
            extra["y"] = extra.pop("vector")
        if "guidance" in extra:
            extra["guidance"] = extra["guidance"].reshape(-1)
        xc = predictor.calculate_input(sigma[idx], x[idx]).to(dtype)
        t = predictor.timestep(sigma[idx]).float()
        context = cond["context"][group, :n].to(device, dtype)
        pieces.append(kmodel.diffusion_model(xc, t, context=context, control=None, transformer_options={},
                                             **extra).float())
        order += group
    out = torch.cat(pieces)
    if order != sorted(order):
        out = out[torch.tensor(order, device=device).argsort()]
    return out


def flow_lora_targets(diffusion_model: nn.Module, engine: FlowEngine) -> Dict[str, nn.Module]:
    """kohya name → Linear of the blocks (the core's rule for the family): Forge maps `lora_unet_` + path."""
    return block_lora_targets(diffusion_model, engine.lora)


def flow_blocks(diffusion_model: nn.Module, engine: FlowEngine) -> List[nn.Module]:
    """The transformer blocks, the units gradient checkpointing recomputes."""
    return [block for name in engine.blocks for block in getattr(diffusion_model, name)]


def refuse_text_encoder(engine: FlowEngine, train_text_encoder: bool) -> None:
    """ValueError before any work: the text encoders of a flow engine stay frozen here."""
    if train_text_encoder:
        raise ValueError(f"train_text_encoder: the text encoders of {engine.name} do not train here; turn "
                         "train_text_encoder off (the transformer's LoRA carries the subject)")
