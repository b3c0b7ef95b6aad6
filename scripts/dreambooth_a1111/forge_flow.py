"""Forge's flow-matching engines (Flux dev and schnell, Chroma): what ForgeBackend does differently for them.

How Forge samples these (read from its source; tests/forge/flow_engine.py checks each point on Forge's own
engines):
- The engine's `KModel.predictor` is a `PredictionFlux` (prediction type 'const'): the transformer's input
  is x itself, its time input is σ (its time embedding multiplies by 1000), the noisy latent is
  (1 − σ)·x0 + σ·ε (`noise_scaling`) and the denoised one x − σ·out. So the transformer's output is the
  velocity ε − x0: dreambooth_core's FlowSchedule, whose timesteps are σ. Its shift is the predictor's:
  Forge's σ grid, e^μ / (e^μ + 1/t − 1), is the core's `shift_sigmas` with s = e^μ (μ = 1.15 for dev at
  Forge's fixed 4096-token length, 1.0 for schnell and Chroma); `flow_shift` reads s off the grid.
- `get_learned_conditioning` gives Flux a dict: T5's `crossattn` (Forge pads it to 256 tokens), CLIP-L's
  pooled `vector` (the transformer's `y`) and, for dev, the distilled `guidance` (Forge's Distilled CFG
  default, 3.5, as kohya trains); Chroma gets T5's output alone, at the prompt's own length. `predict` calls
  the transformer as `KModel.apply_model` does (its `calculate_input` and `timestep`, the computation dtype),
  without the final `calculate_denoised`.
- Captions are cached one at a time and batched by the core: each is zero-padded to TEXT_CAP tokens with
  its real length beside it (`context_len`), and `predict` runs each length apart, on exactly the tokens
  Forge would give the transformer for that prompt.
- The blocks add to their streams out of place (`img = img + ...`), so autograd needs no copies of them.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import torch
from torch import nn

from dreambooth_core.adapters.kohya import FLUX_BLOCK_LINEARS, block_lora_targets
from dreambooth_core.backends.base import UnsupportedModel
from dreambooth_core.training.schedules import shift_sigmas

from .common import owned

log = logging.getLogger("dreambooth")
#: engine class -> the tokenizers the identifier is checked in (Flux: CLIP-L; T5's SentencePiece splits the
#: usual rare identifiers, "sks" in several pieces; Chroma has T5 only)
FLOW_ENGINES = {"Flux": ("clip_l",), "Chroma": ("t5xxl",)}
#: class-image sampling where a request leaves it open (jobs.apply_class_sampling): Forge's Flux preset (CFG 1:
#: dev's guidance is distilled, Distilled CFG keeps Forge's 3.5; Euler, Simple schedule); Chroma keeps the CFG
CLASS_SAMPLING = {"flux": {"class_guidance": 1.0, "class_sampler": "Euler:Simple"},
                  "flux-schnell": {"class_guidance": 1.0, "class_sampler": "Euler:Simple"},
                  "chroma": {"class_sampler": "Euler:Simple"}}
#: T5 tokens a training caption keeps (kohya's limit for Flux dev and Chroma; Forge pads Flux's to 256)
TEXT_CAP = 512


def flow_family(sd_model) -> str:
    """'flux' (dev: Forge passes the distilled guidance), 'flux-schnell' or 'chroma'."""
    if type(sd_model).__name__ == "Chroma":
        return "chroma"
    return "flux" if getattr(sd_model, "use_distilled_cfg_scale", False) else "flux-schnell"


def flow_shift(predictor, kind: str) -> float:
    """The SD3-style shift s of the σ grid Forge samples on, or UnsupportedModel for any other sampling.
    Read from the grid itself (PredictionFlux's `sigmas` at t = k/N), not from a field: Forge stores e^s's
    log as `mu`, Forge Neo as `shift`, and either may re-shift the grid at run time."""
    if type(predictor).__name__ != "PredictionFlux" or getattr(predictor, "prediction_type", None) != "const":
        raise UnsupportedModel(f"the loaded {kind} model samples with {type(predictor).__name__} "
                               f"({getattr(predictor, 'prediction_type', None)}); DreamBooth trains it on Forge's "
                               "rectified-flow sampling (PredictionFlux) only")
    sigmas = predictor.sigmas.detach().to("cpu", torch.float64)
    t = torch.arange(1, len(sigmas) + 1, dtype=torch.float64) / len(sigmas)
    mid = len(sigmas) // 2
    shift = float(sigmas[mid] * (1 - t[mid]) / (t[mid] * (1 - sigmas[mid])))
    if not torch.allclose(shift_sigmas(t, shift), sigmas, atol=1e-5):
        raise UnsupportedModel(f"the loaded {kind} model samples on a σ grid that is no shifted rectified flow; "
                               "DreamBooth trains Flux and Chroma on Forge's own PredictionFlux schedule")
    return shift


def flow_conditioning(cond) -> Dict[str, torch.Tensor]:
    """The core's conditioning from the engine's: `context` (T5, zero-padded to TEXT_CAP tokens),
    `context_len` (its real length), and for Flux `vector` (pooled CLIP-L) and, for dev, `guidance`."""
    parts = cond if isinstance(cond, dict) else {"crossattn": cond}
    text = owned(parts["crossattn"]).float()
    n = text.shape[1]
    if n > TEXT_CAP:
        log.warning("DreamBooth: a caption has %d T5 tokens; training uses the first %d", n, TEXT_CAP)
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


def flow_lora_targets(diffusion_model: nn.Module) -> Dict[str, nn.Module]:
    """kohya name → Linear of the blocks (the core's Flux/Chroma rule): Forge maps `lora_unet_` + path."""
    return block_lora_targets(diffusion_model, FLUX_BLOCK_LINEARS)


def flow_blocks(diffusion_model: nn.Module) -> List[nn.Module]:
    """The transformer blocks, the units gradient checkpointing recomputes."""
    return list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks)


def refuse_text_encoder(kind: str, train_text_encoder: bool) -> None:
    """ValueError before any work: the text encoders of a flow engine stay frozen here."""
    if train_text_encoder:
        raise ValueError(f"train_text_encoder: the text encoders of {kind} (T5, CLIP-L) do not train here; turn "
                         "train_text_encoder off (the transformer's LoRA carries the subject)")
