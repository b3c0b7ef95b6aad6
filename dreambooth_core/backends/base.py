"""The backend protocol: everything the core needs from a host's model, and nothing more.

The trainer, the class-image cache and the sampler talk to a model only through this
interface, so the same training code runs on diffusers models (standalone), on ComfyUI's
MODEL/CLIP/VAE and on the Automatic1111 WebUI's loaded checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # the schedules live with the objective; imported where used, as the trainer imports this
    from ..training.schedules import Schedule

class UnsupportedModel(ValueError):
    """The loaded model is of a kind a backend cannot train (its message names the kind); hosts
    refuse it before any work."""


# Conditioning for one batch: tensors keyed by role, batch first ("context" always; SDXL adds
# "pooled" and "time_ids"). Concatenating two conds along dim 0 concatenates their batches.
Cond = Dict[str, torch.Tensor]


def cat_conds(conds: Sequence[Cond]) -> Cond:
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


@dataclass(frozen=True)
class SampleSettings:
    """How images are sampled; every field is part of the class-image cache key."""

    steps: int = 25
    guidance: float = 5.0
    sampler: str = "dpmpp_2m"
    negative_prompt: str = ""
    width: int = 512
    height: int = 512


class BackendDefaults:
    """What a backend does where it has nothing of its own to do; every backend inherits it, so the
    trainer calls each method of the protocol without asking whether it exists."""

    #: True where a sample's pixels would not encode back into what the model made (Stable Cascade's stage C:
    #: its VAE decodes only a preview): `generate` then also gives each sample's latents (its `latents` list),
    #: and the class-image cache keeps them for training (class_images.cache)
    class_latents: bool = False

    def schedule(self) -> "Schedule":
        """The discrete schedule the SD1/SD2/SDXL backends train with, from their ᾱ_t and target."""
        from ..training.schedules import DiscreteSchedule

        return DiscreteSchedule(self.alphas_cumprod, self.prediction_type)

    def attach_lora(self, network) -> None:
        network.attach()

    def use_wrapped(self, models: List[nn.Module]) -> None:
        pass

    def unwrap(self) -> None:
        pass

    def release_encoders(self, *, vae: bool = True, text_encoders: bool = True) -> None:
        pass

    def base_fingerprint(self) -> str:
        """adapters.metadata.weights_fingerprint of the denoiser (the first trainable model)."""
        from ..adapters.metadata import weights_fingerprint

        return weights_fingerprint(self.trainable_models(True, False)[0].state_dict())


@runtime_checkable
class Backend(Protocol):
    """A loaded text-to-image diffusion model, as the core sees it."""

    #: "epsilon" or "v_prediction" (discrete backends; a flow backend may leave it unused: its
    #: `schedule()` is what the trainer reads)
    prediction_type: str
    #: the base model's family: "sd1", "sd2" or "sdxl" (what the LoRA file's metadata names)
    family: str
    #: ᾱ_t of the discrete training schedule, shape (T,), float32 on the CPU (discrete backends, for
    #: BackendDefaults.schedule(); a flow backend may leave it unused)
    alphas_cumprod: torch.Tensor
    #: the model's native training resolution in pixels (512 for SD1.5, 1024 for SDXL)
    native_resolution: int
    #: pixels per latent cell (8 for Stable Diffusion)
    latent_factor: int

    @property
    def device(self) -> torch.device: ...

    def fingerprint(self) -> str:
        """A stable id of the base weights (used to key the class-image cache)."""

    def describe(self) -> str:
        """A short human-readable name of the base model (written into LoRA metadata)."""

    def base_fingerprint(self) -> str:
        """A short hash of the denoiser's base weights, which a loader recomputes from a loaded model
        (adapters.metadata.weights_fingerprint; BackendDefaults hashes the first trainable model)."""

    def tokenizers(self) -> List[object]:
        """The model's tokenizers (transformers-style: `.tokenize`, `.encode`, `.get_vocab`)."""

    def encode_text(self, prompts: Sequence[str], *, size: tuple[int, int]) -> Cond:
        """Conditioning for prompts; differentiable when the text encoder trains.
        `size` (height, width) is what SDXL's size conditioning needs."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) → scaled latents (B, C, H/f, W/f)."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1]."""

    def schedule(self) -> "Schedule":
        """How this model is trained: its noise schedule and prediction target (BackendDefaults: the
        discrete schedule of `alphas_cumprod` and `prediction_type`; a flow model returns a FlowSchedule)."""

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's raw output, the target of `schedule()` (ε, v or the flow velocity), at its
        timesteps (integer t for a discrete schedule, σ ∈ (0, 1) for a flow schedule)."""

    def lora_targets(self, unet: bool, text_encoder: bool, conv: bool = False) -> Dict[str, nn.Module]:
        """Modules a LoRA may attach to, keyed by their kohya-style LoRA name
        (`lora_unet_…`, `lora_te_…`, `lora_te1_…`/`lora_te2_…` for SDXL); `conv` adds the
        UNet's convolutions (LoCon)."""

    def attach_lora(self, network) -> None:
        """Inject a LoRANetwork's adapters into the model (BackendDefaults: wrap the target
        modules' forwards; a host may use its own mechanism, e.g. ComfyUI's weight wrappers)."""

    def trainable_models(self, unet: bool, text_encoder: bool) -> List[nn.Module]:
        """The nn.Modules that train (for full fine-tuning, DDP/FSDP wrapping, grad mode)."""

    def use_wrapped(self, models: List[nn.Module]) -> None:
        """Run forwards through these (e.g. DDP-wrapped) versions of `trainable_models()`."""

    def unwrap(self) -> None:
        """Run forwards through the plain modules again (after training)."""

    def release_encoders(self, *, vae: bool = True, text_encoders: bool = True) -> None:
        """Free the VAE and/or the frozen text encoders once their outputs are cached; the backend
        can then no longer encode or sample (BackendDefaults: keep them)."""

    def set_gradient_checkpointing(self, enabled: "bool | str") -> None:
        """True/False, or a scope of config.GRADIENT_CHECKPOINTING other than "off" (e.g.
        "attention"): a backend that cannot checkpoint selectively treats any scope as True."""

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], settings: SampleSettings,
                 progress: Optional[object] = None) -> List[np.ndarray]:
        """Sample one image per prompt/seed with the model as it is now (uint8, H×W×3). A backend with
        `class_latents` also takes `latents`, a list it appends each sample's latents (C, h, w) to."""

    def save_full(self, path: str, metadata: Optional[Dict[str, str]] = None) -> List[str]:
        """Save fully fine-tuned weights under `path` with `metadata` in each safetensors file's
        header; return the files written."""
