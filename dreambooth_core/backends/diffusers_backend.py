"""The standalone backend: the Backend protocol over diffusers components (UNet, VAE, CLIP text
encoders), loaded from disk by `diffusers_loading`. diffusers is imported here only, lazily, so
hosts that pin old libraries can still import the rest of the core.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..adapters.kohya import kohya_name
from .base import BackendDefaults, Cond, SampleSettings

SAMPLERS = ("dpmpp_2m", "euler", "euler_a", "ddim")
# Module classes whose Linear/Conv children carry LoRA (kohya's choice of targets).
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


def _kohya_targets(root: nn.Module, prefix: str, block_classes: Sequence[str],
                   path_prefix: str = "") -> Dict[str, nn.Module]:
    targets: Dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        name = path_prefix + name
        if type(module).__name__ not in block_classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)) and child_name:
                full = f"{name}.{child_name}" if name else child_name
                targets[kohya_name(prefix, full)] = child
    return targets


def _transformer_blocks_by_level(unet: nn.Module) -> Dict[int, List[nn.Module]]:
    """The UNet's transformer blocks by resolution level: 0 is the full latent size (down_blocks.0
    and the last up block), each level below halves it; the mid block is the lowest."""
    depth = len(unet.down_blocks)
    levels: Dict[int, List[nn.Module]] = {}
    for name, module in unet.named_modules():
        if type(module).__name__ not in UNET_ATTENTION_BLOCKS:
            continue
        kind, _, rest = name.partition(".")
        index = int(rest.split(".", 1)[0]) if kind in ("down_blocks", "up_blocks") else depth
        level = index if kind == "down_blocks" else depth - 1 - index if kind == "up_blocks" else depth
        levels.setdefault(level, []).append(module)
    return levels


class DiffusersBackend(BackendDefaults):
    """SD1.x / SD2.x / SDXL-family models as diffusers components."""

    def __init__(self, *, unet, vae, text_encoders: list, tokenizers: list, scheduler_config: dict,
                 name: str, fingerprint: str, native_resolution: int, arch: str = "sd",
                 device: Optional[torch.device] = None, weight_dtype: torch.dtype = torch.float32):
        self.unet, self.vae = unet, vae
        self.text_encoders, self._tokenizers = list(text_encoders), list(tokenizers)
        self.scheduler_config = dict(scheduler_config)
        self.name, self._fingerprint = name, fingerprint
        self.native_resolution = native_resolution
        self.arch = arch
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.weight_dtype = weight_dtype
        self._device = torch.device(device or "cpu")
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(self.scheduler_config)
        self.alphas_cumprod = ddpm.alphas_cumprod.float().cpu()
        for m in [unet, vae, *text_encoders]:
            m.requires_grad_(False).eval().to(device=self._device)
            if next(m.parameters()).dtype != weight_dtype:
                m.to(dtype=weight_dtype)
        self._unet_forward = unet
        self._te_forward = list(text_encoders)

    # -- identity ----------------------------------------------------------------------------
    @property
    def family(self) -> str:
        if self.arch == "sdxl":
            return "sdxl"
        return "sd2" if self.unet.config.cross_attention_dim == 1024 else "sd1"

    @property
    def device(self) -> torch.device:
        return self._device

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> str:
        return self.name

    def tokenizers(self) -> list:
        return self._tokenizers

    # -- encoding ----------------------------------------------------------------------------
    def _ids(self, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self._device)

    def encode_text(self, prompts: Sequence[str], *, size: tuple[int, int]) -> Cond:
        self._require("text_encoder")
        if self.arch != "sdxl":
            return {"context": self._te_forward[0](self._ids(self._tokenizers[0], prompts))[0]}
        hidden, pooled = [], None
        for encoder, tokenizer in zip(self._te_forward, self._tokenizers):
            out = encoder(self._ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (the second encoder)
        h, w = size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden[0].dtype, device=self._device)
        return {"context": torch.cat(hidden, dim=-1), "pooled": pooled,
                "time_ids": time_ids.repeat(len(prompts), 1)}

    def release_encoders(self, *, vae: bool = True, text_encoders: bool = True) -> None:
        """Drop the VAE and/or the text encoders for the rest of a training run whose latents and
        caption embeddings are cached (`DreamBoothTrainer(release_frozen=True)`): their weights
        are freed (~0.8 GB for SD1.5 in fp32). Sampling, encoding and `save_full` need them, so
        this backend cannot do those afterwards; load the model again for that."""
        import gc

        if vae:
            self.vae = None
        if text_encoders:
            self.text_encoders, self._te_forward = [], []
        gc.collect()

    def _require(self, part: str) -> None:
        missing = self.vae is None if part == "vae" else not self.text_encoders
        if missing:
            raise RuntimeError(f"the {'VAE' if part == 'vae' else 'text encoder'} of {self.name} was released after "
                               "caching (release_encoders); load the model again to encode, sample or save it")

    @contextmanager
    def _vae_precision(self) -> Iterator[torch.dtype]:
        """The VAE in the dtype it can run in, for one encode or decode. A VAE whose config says
        `force_upcast` (SDXL's) overflows in fp16: NaN latents, and a run that stops as diverged.
        Like diffusers' SDXL pipelines, such a VAE runs in fp32 for the call and is fp16 again
        after it (the round trip is exact), so the rest of the run keeps the fp16 memory use."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if upcast:
            _cast_quietly(vae, torch.float32)
        try:
            yield vae.dtype
        finally:
            if upcast:
                _cast_quietly(vae, torch.float16)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self._require("vae")
        with self._vae_precision() as dtype:
            latents = self.vae.encode(pixels.to(self._device, dtype)).latent_dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        self._require("vae")
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        with self._vae_precision() as dtype:
            z = latents.to(self._device, dtype) / self.vae.config.scaling_factor + shift
            return self.vae.decode(z).sample.float().clamp(-1, 1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        kwargs = {}
        if "pooled" in cond:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        out = self._unet_forward(noisy, timesteps.to(self._device), encoder_hidden_states=cond["context"],
                                 **kwargs)
        return out.sample if hasattr(out, "sample") else out[0]

    # -- training surface --------------------------------------------------------------------
    def lora_targets(self, unet: bool, text_encoder: bool, conv: bool = False) -> Dict[str, nn.Module]:
        targets: Dict[str, nn.Module] = {}
        if unet:
            blocks = UNET_ATTENTION_BLOCKS + (UNET_CONV_BLOCKS if conv else ())
            targets.update(_kohya_targets(self.unet, "lora_unet", blocks))
        if text_encoder:
            prefixes = ["lora_te"] if len(self.text_encoders) == 1 else ["lora_te1", "lora_te2"]
            for prefix, encoder in zip(prefixes, self.text_encoders):
                # transformers 5 dropped the `text_model.` level that the LoRA names keep.
                path = "" if hasattr(encoder, "text_model") else "text_model."
                targets.update(_kohya_targets(encoder, prefix, TEXT_BLOCKS, path))
        return targets

    def trainable_models(self, unet: bool, text_encoder: bool) -> List[nn.Module]:
        return ([self.unet] if unet else []) + (list(self.text_encoders) if text_encoder else [])

    def use_wrapped(self, models: List[nn.Module]) -> None:
        models = list(models)
        for original, wrapped in zip(self.trainable_models(True, True), models + [None] * 3):
            if wrapped is None:
                continue
            if original is self.unet:
                self._unet_forward = wrapped
            else:
                self._te_forward[self.text_encoders.index(original)] = wrapped

    def unwrap(self) -> None:
        self._unet_forward = self.unet
        self._te_forward = list(self.text_encoders)

    def set_gradient_checkpointing(self, enabled: "bool | str") -> None:
        """Which activations the backward pass recomputes instead of keeping (config's
        GRADIENT_CHECKPOINTING). True or "full": every UNet block's (least memory, slowest).
        "attention": only the transformer blocks' (each `Transformer2DModel` checkpoints its
        `BasicTransformerBlock`s): their saved activations (token-wide attention inputs, the
        4x-wide feed-forward) are most of what a step keeps, while the convolutions, most of a CPU
        step's time, run once. "attention-hires": only the transformer blocks of the highest-
        resolution level that has them, which keep the most activation memory per recomputed
        FLOP (memory grows with tokens x width, linear work with tokens x width^2): on SD1.5 they
        hold over half of the transformer activations for a third of their linear work. The text
        encoders are all transformer layers: they checkpoint in every mode but "off"."""
        scope = ("full" if enabled else "off") if isinstance(enabled, bool) else enabled
        if scope not in ("off", "attention-hires", "attention", "full"):
            raise ValueError(f"gradient checkpointing {enabled!r}: use off, attention-hires, attention or full "
                             "(or True/False)")
        self.unet.disable_gradient_checkpointing()
        for te in self.text_encoders:
            te.gradient_checkpointing_disable()
        if scope == "off":
            return
        if scope == "full":
            self.unet.enable_gradient_checkpointing()
        else:
            levels = _transformer_blocks_by_level(self.unet)
            if not levels:
                raise ValueError(f"gradient checkpointing {scope!r}: {self.name} has no transformer blocks; use 'full'")
            chosen = levels[min(levels)] if scope == "attention-hires" else [b for bs in levels.values() for b in bs]
            for block in chosen:
                block.enable_gradient_checkpointing()
        for te in self.text_encoders:
            te.gradient_checkpointing_enable()

    # -- sampling ----------------------------------------------------------------------------
    def _scheduler(self, sampler: str):
        import diffusers

        classes = {"dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "euler": diffusers.EulerDiscreteScheduler,
                   "euler_a": diffusers.EulerAncestralDiscreteScheduler, "ddim": diffusers.DDIMScheduler}
        if sampler not in classes:
            raise ValueError(f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        return classes[sampler].from_config(self.scheduler_config)

    def pipeline(self, sampler: str = "dpmpp_2m"):
        """A diffusers pipeline over the live components (LoRA adapters included)."""
        from .pipelines import pipeline_classes

        StableDiffusionPipeline, StableDiffusionXLPipeline = pipeline_classes()
        self._require("vae")
        self._require("text_encoder")
        if self.arch == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=self.vae, unet=self.unet, text_encoder=self.text_encoders[0],
                                             text_encoder_2=self.text_encoders[1], tokenizer=self._tokenizers[0],
                                             tokenizer_2=self._tokenizers[1], scheduler=self._scheduler(sampler))
        else:
            pipe = StableDiffusionPipeline(vae=self.vae, unet=self.unet, text_encoder=self.text_encoders[0],
                                           tokenizer=self._tokenizers[0], scheduler=self._scheduler(sampler),
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], settings: SampleSettings,
                 progress=None, batch_size: int = 8) -> List[np.ndarray]:
        if len(prompts) != len(seeds):
            raise ValueError("generate: one seed per prompt")
        self._require("vae")
        self._require("text_encoder")
        modes = [(m, m.training) for m in [self.unet, self.vae, *self.text_encoders]]
        for m, _ in modes:
            m.eval()
        pipe = self.pipeline(settings.sampler)
        images: List[np.ndarray] = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
                latents = torch.stack([
                    torch.randn((self.unet.config.in_channels, settings.height // self.latent_factor,
                                 settings.width // self.latent_factor), generator=g) for g in gens
                ]).to(self._device, self.unet.dtype)
                out = pipe(chunk, negative_prompt=[settings.negative_prompt] * len(chunk) if settings.guidance > 1 else None,
                           num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                           height=settings.height, width=settings.width, latents=latents,
                           output_type="np").images
                images.extend((np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8))
                if progress is not None:
                    progress(len(images), len(prompts))
        finally:
            for m, was_training in modes:
                m.train(was_training)
        return images

    # -- saving ------------------------------------------------------------------------------
    def save_full(self, path: str, metadata: Optional[Dict[str, str]] = None) -> List[str]:
        from diffusers import DDPMScheduler

        from .. import fileio

        pipe = self.pipeline()
        pipe.scheduler = DDPMScheduler.from_config(self.scheduler_config)
        pipe.save_pretrained(path, safe_serialization=True)
        files = sorted(str(p) for p in Path(path).rglob("*.safetensors"))
        for file in files if metadata else []:
            fileio.add_metadata(file, metadata)
        return files


def _cast_quietly(model: nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)` without diffusers' warning about modules to keep in fp32, which diffusers
    0.42 logs on every cast even when there are none (its list is empty): the per-call upcast would
    print it for every batch of images encoded. diffusers' verbosity is restored."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model.to(dtype=dtype)
    finally:
        logging.set_verbosity(level)
