"""The DreamBooth objective on a discrete diffusion schedule.

Noisy inputs and targets for ε- and v-prediction, offset noise, min-SNR weighting, and the
class-specific prior-preservation loss L = L_instance + λ·L_class (Ruiz et al. 2022, eq. 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class NoisedBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor  # per-sample loss weight (min-SNR), shape (B,)


def sample_noise(shape: torch.Size | tuple, generator: torch.Generator, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise; offset noise adds a per-channel constant so the model can learn to
    change an image's overall brightness/colour (otherwise the start noise decides it)."""
    noise = torch.randn(shape, generator=generator)
    if offset_noise:
        noise += offset_noise * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[timesteps]
    return a / (1 - a)


def make_batch(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor, prediction_type: str,
               min_snr_gamma: float | None = None) -> NoisedBatch:
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


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean squared error, or with `weight` (one per element of target) its weighted mean."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1)
    if weight is None:
        return err.mean(1)
    weight = weight.to(err).flatten(1)
    return (err * weight).sum(1) / weight.sum(1).clamp_min(1e-8)


@dataclass
class LossParts:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def dreambooth_loss(pred: torch.Tensor, batch: NoisedBatch, n_instance: int,
                    prior_weight: float, instance_weight: torch.Tensor | None = None) -> LossParts:
    """Instance samples come first in the batch, class samples after them. `instance_weight`
    (the instance latents' shape) weights each instance element, a masked loss: each sample's
    loss is then its weighted mean, so a small subject counts as much as a large one."""
    weight = None
    if instance_weight is not None:
        weight = torch.ones(pred.shape[0], batch.target[0].numel(), device=pred.device)
        weight[:n_instance] = instance_weight.flatten(1)
    losses = per_sample_mse(pred, batch.target, weight) * batch.weight
    instance = losses[:n_instance].mean()
    if n_instance == losses.shape[0]:
        return LossParts(instance, instance.detach(), None)
    prior = losses[n_instance:].mean()
    return LossParts(instance + prior_weight * prior, instance.detach(), prior.detach())
