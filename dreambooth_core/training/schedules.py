"""How a model is trained: its noise schedule and prediction target, behind one small interface.

A `Schedule` draws the timesteps of a batch (on the step's CPU generator, so a run is reproducible
and resumable) and makes the noisy inputs and targets from clean latents and noise. The trainer
knows only this interface; a backend says which schedule its model was trained with
(`Backend.schedule()`):

- `DiscreteSchedule`: DDPM's ᾱ_t over integer timesteps, ε- or v-prediction (SD1/SD2/SDXL).
- `FlowSchedule`: rectified flow (SD3, Flux, Chroma, Lumina 2): a straight line from the image
  (σ = 0) to noise (σ = 1), the model predicting its velocity. Cosmos Predict2's "RFlow" is the same
  line in its own coordinates (an EDM-style σ_e = σ/(1 − σ), input x0 + σ_e·ε scaled by 1 − σ), which its
  backend converts to; `max_sigma` keeps the draws on the part of the line the model samples from.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Dict, Optional, Protocol, runtime_checkable

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
FLOW_SAMPLINGS = ("logit_normal", "uniform")
# σ stays this far inside (0, 1): at σ = 0 the input is the clean image and at σ = 1 pure noise, the
# ends of the line where a float32 logit-normal draw or a uniform draw of 0 could otherwise land.
SIGMA_MARGIN = 1e-5


@dataclass
class NoisedBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor  # what Backend.predict receives: integer t (discrete) or σ (flow)
    target: torch.Tensor
    weight: torch.Tensor  # per-sample loss weight (min-SNR), shape (B,)


@runtime_checkable
class Schedule(Protocol):
    """A model's training schedule: which timesteps a step trains on and what it predicts there."""

    #: "discrete" (ᾱ_t over integer t, ε or v) or "flow" (rectified flow, σ ∈ (0, 1), velocity)
    kind: str

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` timesteps drawn on the CPU `generator`, in the form `Backend.predict` takes."""

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               min_snr_gamma: Optional[float] = None) -> NoisedBatch:
        """The noisy latents, the target the model should predict, and each sample's loss weight."""


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[timesteps]
    return a / (1 - a)


def make_batch(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor, prediction_type: str,
               min_snr_gamma: float | None = None) -> NoisedBatch:
    """x_t = √ᾱ·x0 + √(1−ᾱ)·ε at integer timesteps; the target is ε or v = √ᾱ·ε − √(1−ᾱ)·x0."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
    a = alphas_cumprod.to(latents.device, torch.float32)[timesteps.to(latents.device)]
    shape = (-1,) + (1,) * (latents.ndim - 1)
    sa, so = a.sqrt().view(shape), (1 - a).sqrt().view(shape)
    noisy = sa * latents + so * noise
    target = noise if prediction_type == "epsilon" else sa * noise - so * latents
    weight = torch.ones_like(a)
    if min_snr_gamma:
        s = a / (1 - a)
        clipped = torch.clamp(s, max=min_snr_gamma)
        # ε-loss weight min(SNR, γ)/SNR; v-loss already carries a (SNR+1) factor (Hang et al. 2023).
        weight = clipped / s if prediction_type == "epsilon" else clipped / (s + 1)
    return NoisedBatch(noisy, timesteps, target, weight)


class DiscreteSchedule:
    """DDPM's discrete schedule (SD1, SD2, SDXL): timesteps uniform over 0…T−1, ε or v targets,
    optional min-SNR weights."""

    kind = "discrete"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type

    def __repr__(self) -> str:
        return f"DiscreteSchedule(T={len(self.alphas_cumprod)}, prediction_type={self.prediction_type!r})"

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.alphas_cumprod), (n,), generator=generator)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               min_snr_gamma: Optional[float] = None) -> NoisedBatch:
        return make_batch(latents, noise, timesteps, self.alphas_cumprod, self.prediction_type, min_snr_gamma)


def schedule_settings(schedule: Schedule) -> Dict[str, object]:
    """What a checkpoint records of a schedule, in plain JSON values: its kind and, for a dataclass
    schedule (FlowSchedule), every field, so a resumed run refuses another shift or sampling."""
    out: Dict[str, object] = {"kind": schedule.kind}
    if is_dataclass(schedule):
        for f in fields(schedule):
            value = getattr(schedule, f.name)
            if value is not None:  # an unset option (max_sigma) leaves the record as it was before it existed
                out[f.name] = value if isinstance(value, (str, bool)) else float(value)
    return out


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ ↦ shift·σ / (1 + (shift − 1)·σ): the resolution shift of SD3/Flux. It keeps 0 and 1 and, for
    shift > 1, moves every σ towards noise, as larger images need more noise to hide their content."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def refuse_min_snr(schedule: Schedule, min_snr_gamma: Optional[float]) -> None:
    """ValueError for min-SNR weighting on a schedule it is not defined for (before any work)."""
    if min_snr_gamma and schedule.kind != "discrete":
        raise ValueError(
            f"min_snr_gamma={min_snr_gamma:g}: min-SNR weighting is defined for ε/v-prediction on a discrete ᾱ "
            f"schedule, and this model trains with a {schedule.kind} schedule (rectified flow, velocity target). "
            "Leave min_snr_gamma unset (0) for this model.")


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow as SD3 and Flux train it: x_σ = (1 − σ)·x0 + σ·ε, target the velocity ε − x0,
    every sample weighted alike. σ is drawn logit-normal (σ = sigmoid(N(mean, std)), SD3's default:
    most steps in the middle, where the velocity is hardest to predict) or uniform, then shifted
    by the family's `shift`. `timesteps` are the σ values; the backend maps σ to its model's time input.
    `max_sigma` (None: 1): the noisiest σ the model is sampled from where that is below 1 (Cosmos Predict2:
    its sigma_max 80 is σ = 80/81); draws above it are taken at it, so no step trains a noise level the
    model never sees."""

    shift: float = 1.0
    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    max_sigma: Optional[float] = None

    kind = "flow"  # a class attribute, not a field

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"shift {self.shift!r}: must be > 0 (1 for no shift; Flux uses 3, SD3 3.0)")
        if self.sampling not in FLOW_SAMPLINGS:
            raise ValueError(f"sampling {self.sampling!r}: expected one of {FLOW_SAMPLINGS}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std {self.logit_std!r}: must be > 0 (SD3 uses 1.0)")
        if self.max_sigma is not None and not SIGMA_MARGIN < self.max_sigma <= 1:
            raise ValueError(f"max_sigma {self.max_sigma!r}: must be in ({SIGMA_MARGIN}, 1] (None for 1)")

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator) * self.logit_std + self.logit_mean)
        else:
            u = torch.rand(n, generator=generator)
        sigmas = shift_sigmas(u.to(torch.float32), float(self.shift))
        top = 1 - SIGMA_MARGIN if self.max_sigma is None else min(1 - SIGMA_MARGIN, float(self.max_sigma))
        return sigmas.clamp(SIGMA_MARGIN, top)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               min_snr_gamma: Optional[float] = None) -> NoisedBatch:
        refuse_min_snr(self, min_snr_gamma)
        sigmas = timesteps.to(latents.device, torch.float32)
        s = sigmas.view((-1,) + (1,) * (latents.ndim - 1))
        noisy = (1 - s) * latents + s * noise
        return NoisedBatch(noisy, sigmas, noise - latents, torch.ones_like(sigmas))
