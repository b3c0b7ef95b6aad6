"""The DreamBooth objective: noise (with offset noise), the model's schedule (`schedules`: noisy
inputs, targets and min-SNR weights for a discrete ε/v schedule or for rectified flow), and the
class-specific prior-preservation loss L = L_instance + λ·L_class (Ruiz et al. 2022, eq. 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .schedules import (PREDICTION_TYPES, DiscreteSchedule, FlowSchedule, NoisedBatch, Schedule, make_batch,
                        refuse_min_snr, schedule_settings, shift_sigmas, snr)

__all__ = ["PREDICTION_TYPES", "DiscreteSchedule", "FlowSchedule", "NoisedBatch", "Schedule", "make_batch",
           "refuse_min_snr", "schedule_settings", "shift_sigmas", "snr", "sample_noise", "per_sample_mse",
           "LossParts", "InstanceWeights", "dreambooth_loss", "dreambooth_loss_by_part"]


def sample_noise(shape: torch.Size | tuple, generator: torch.Generator, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise; offset noise adds a per-channel constant so the model can learn to
    change an image's overall brightness/colour (otherwise the start noise decides it)."""
    noise = torch.randn(shape, generator=generator)
    if offset_noise:
        noise += offset_noise * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean squared error, or with `weight` (one per element of target) its weighted mean."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1)
    if weight is None:
        return err.mean(1)
    weight = weight.to(err).flatten(1)
    return (err * weight).sum(1) / weight.sum(1).clamp_min(1e-8)


@dataclass
class InstanceWeights:
    """How much each instance sample counts where a factor per sample is needed beside the masks: a
    subject's loss weight multiplies its samples' losses, while a mask only weights within a sample
    (each sample's loss is its weighted mean, so a factor folded into the mask would cancel)."""

    elements: torch.Tensor | None  # the instance latents' shape (masked loss), or None
    samples: torch.Tensor  # (n_instance,): each sample's factor

    def to(self, device) -> "InstanceWeights":
        return InstanceWeights(None if self.elements is None else self.elements.to(device), self.samples.to(device))


def _split(instance_weight: "torch.Tensor | InstanceWeights | None"):
    """(element weights or None, sample factors or None) of a draw's instance weights."""
    if isinstance(instance_weight, InstanceWeights):
        return instance_weight.elements, instance_weight.samples
    return instance_weight, None


@dataclass
class LossParts:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def dreambooth_loss(pred: torch.Tensor, batch: NoisedBatch, n_instance: int,
                    prior_weight: float, instance_weight: torch.Tensor | InstanceWeights | None = None) -> LossParts:
    """Instance samples come first in the batch, class samples after them. `instance_weight`
    (the instance latents' shape) weights each instance element, a masked loss: each sample's
    loss is then its weighted mean, so a small subject counts as much as a large one. As
    InstanceWeights it also multiplies each instance sample's loss by its subject's loss weight."""
    elements, samples = _split(instance_weight)
    weight = None
    if elements is not None:
        weight = torch.ones(pred.shape[0], batch.target[0].numel(), device=pred.device)
        weight[:n_instance] = elements.flatten(1)
    losses = per_sample_mse(pred, batch.target, weight) * batch.weight
    instance = losses[:n_instance] if samples is None else losses[:n_instance] * samples.to(losses)
    return _combine(instance, losses[n_instance:] if n_instance < losses.shape[0] else None, prior_weight)


def dreambooth_loss_by_part(preds: Sequence[torch.Tensor], batches: Sequence[NoisedBatch], prior_weight: float,
                            instance_weight: torch.Tensor | InstanceWeights | None = None) -> LossParts:
    """`dreambooth_loss` of an instance part and (optionally) a class part predicted apart: a non-square
    bucket's latents have another size than the square class images' and cannot share a batch.
    Each sample's loss depends only on its own part, so for equal sizes this is the merged loss."""
    elements, samples = _split(instance_weight)
    instance = per_sample_mse(preds[0], batches[0].target, elements) * batches[0].weight
    if samples is not None:
        instance = instance * samples.to(instance)
    prior = per_sample_mse(preds[1], batches[1].target) * batches[1].weight if len(preds) > 1 else None
    return _combine(instance, prior, prior_weight)


def _combine(instance_losses: torch.Tensor, class_losses: torch.Tensor | None, prior_weight: float) -> LossParts:
    """L = mean instance loss + λ · mean class loss (eq. 2), from per-sample losses."""
    instance = instance_losses.mean()
    if class_losses is None:
        return LossParts(instance, instance.detach(), None)
    prior = class_losses.mean()
    return LossParts(instance + prior_weight * prior, instance.detach(), prior.detach())
