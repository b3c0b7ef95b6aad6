"""The "a1111" backend: dreambooth_core's Backend protocol on the WebUI's loaded `shared.sd_model`.

- Conditioning is the WebUI's own (`sd_model.get_learned_conditioning`, through its CLIP hijack),
  so a caption is encoded in training exactly as the same text is in a txt2img prompt; for SDXL
  (generative-models' `DiffusionEngine`) that is its conditioner's cross-attention context (CLIP-L and
  CLIP-G) and ADM vector (CLIP-G's pooled output, the size and crop embeddings of the training size).
- Latents are the posterior's mode times `scale_factor` (`encode_first_stage` for ldm; for SDXL, whose
  `encode_first_stage` samples, the same posterior's mean); a host whose `encode_first_stage` returns a
  tensor (reForge) has scaled it already. `predict` is the model's denoiser (`apply_model`) at integer
  timesteps; ε or v and ᾱ_t come from the model itself (`parameterization`, `alphas_cumprod`), so SD1.x,
  SD2 (ε and v-prediction) and SDXL need no special case there.
- Text-encoder LoRAs: SD1's CLIP-L (`lora_te_`), SDXL's CLIP-L and OpenCLIP-G (`lora_te1_`, `lora_te2_`;
  open_clip_lora.py puts LoRAs on OpenCLIP's fused attention). SD2's OpenCLIP-H does not train yet.
- Class images and previews are made by the WebUI's own txt2img processing, so class image i is
  the image txt2img gives for that prompt, sampler and seed.
- The model is shared with the rest of the WebUI: LoRA adapters are attached for the run only
  and removed by `release()`; full fine-tuning trains the loaded weights in place and `release()`
  puts the original weights back.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from dreambooth_core import fileio
from dreambooth_core.backends.base import BackendDefaults, UnsupportedModel
from dreambooth_core.adapters import ADAPTER_ATTR

from .common import checkpointed, conditioning_parts, owned, prompt_batch, unet_blocks
from .names import clip_lora_targets, unet_lora_targets
from .open_clip_lora import open_clip_lora_targets

log = logging.getLogger("dreambooth")
DEFAULT_SAMPLER = "DPM++ 2M"
_ABSENT = object()


class Interrupted(Exception):
    """The WebUI's Interrupt (or the job's Cancel) stopped a generation mid-image."""


class OpenClipTokenizer:
    """SD2's open_clip tokenizer with the transformers-style methods dreambooth_core.dataset.tokens uses."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def tokenize(self, text: str) -> List[str]:
        return [self._tok.decoder[i] for i in self._tok.encode(text)]

    def get_vocab(self) -> Dict[str, int]:
        return dict(self._tok.encoder)

    def convert_tokens_to_ids(self, piece: str):
        return self._tok.encoder.get(piece)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return list(self._tok.encode(text))

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


def loaded_model():
    """The WebUI's current model, or a ValueError a user can act on."""
    from modules import shared

    model = shared.sd_model
    if model is None:
        raise ValueError("no checkpoint is loaded in the WebUI: pick one in the 'Stable Diffusion checkpoint' menu")
    return model


class A1111Backend(BackendDefaults):
    """The WebUI's loaded checkpoint, as dreambooth_core sees a model."""

    def __init__(self, sd_model=None, *, mode: str = "lora", train_text_encoder: bool = False):
        self.m = sd_model if sd_model is not None else loaded_model()
        self.is_sdxl = bool(getattr(self.m, "is_sdxl", False))
        self._check_family()
        param = getattr(self.m, "parameterization", "eps")
        if param not in ("eps", "v"):
            raise UnsupportedModel(f"the loaded checkpoint predicts {param!r}; only ε and v-prediction train here")
        self.prediction_type = "epsilon" if param == "eps" else "v_prediction"
        self.is_sd2 = bool(getattr(self.m, "is_sd2", False))
        self.family = "sdxl" if self.is_sdxl else "sd2" if self.is_sd2 else "sd1"
        if mode == "full" and self.is_sdxl:
            raise ValueError("mode 'full': full fine-tuning of SDXL does not run in the WebUI; choose mode 'lora'")
        if train_text_encoder and self.is_sd2:
            raise UnsupportedModel("train_text_encoder: the SD2 text encoder (OpenCLIP) does not train here yet; "
                                   "turn it off (the UNet LoRA still binds the identifier)")
        alphas = getattr(self.m, "alphas_cumprod_original", None)
        if alphas is None:
            alphas = self.m.alphas_cumprod
        self.alphas_cumprod = alphas.detach().float().cpu()
        self.native_resolution = 1024 if self.is_sdxl else 768 if self.prediction_type == "v_prediction" and \
            self.is_sd2 else 512
        encoder = getattr(self.m.first_stage_model, "encoder", None)
        self.latent_factor = 2 ** (getattr(encoder, "num_resolutions", 4) - 1)
        self.mode = mode
        self.train_text_encoder = bool(train_text_encoder)
        self._targets: Dict[str, nn.Module] = {}
        self._containers: Optional[List[nn.Module]] = None
        self._backup: Optional[Dict[str, torch.Tensor]] = None
        self._backup_dtypes: List[torch.dtype] = []
        self._grad_flags: List[Tuple[nn.Parameter, bool]] = []
        self._checkpointing = False
        self._patches: List[Tuple[nn.Module, str, object]] = []  # (object, attribute, its previous value)
        self._block_patches: List[Tuple[nn.Module, str, object]] = []  # SDXL's checkpointed UNet blocks
        self._fingerprint: Optional[str] = None

    def _check_family(self) -> None:
        """Refuse, by name, what the backend cannot train: it knows SD1/SD2 (ldm) and SDXL base (sgm)."""
        m = self.m
        what = f"{type(m).__name__} ({type(m).__module__})"
        if getattr(m, "is_sd3", False) or not hasattr(m, "cond_stage_model"):
            raise UnsupportedModel(f"the loaded checkpoint is a {what} model; DreamBooth in the WebUI trains SD1.x, "
                                   "SD2.x and SDXL checkpoints: load one of those")
        if self.is_sdxl:
            if getattr(m, "is_sdxl_inpaint", False):
                raise UnsupportedModel("the loaded checkpoint is an SDXL inpainting model (its UNet takes a mask and a "
                                       "masked image too); DreamBooth trains text-to-image checkpoints: load the base")
            kinds = [type(e.wrapped).__name__ for e in m.conditioner.embedders if hasattr(e, "wrapped")]
            if kinds != ["FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"]:
                raise UnsupportedModel(f"the loaded SDXL checkpoint's text encoders are {kinds} (the SDXL refiner, or "
                                       "another variant); DreamBooth trains the SDXL base (CLIP-L and OpenCLIP-G): "
                                       "load an SDXL base checkpoint")

    # -- identity ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.m.model.diffusion_model.parameters()).device

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the WebUI holds the UNet in (fp16 on a GPU unless --no-half)."""
        return next(self.m.model.diffusion_model.parameters()).dtype

    def fingerprint(self) -> str:
        """The checkpoint's sha256 (the WebUI caches it) and the VAE file: the same after a restart,
        and unaffected by LoRAs the WebUI has applied in place to the weights."""
        if self._fingerprint is None:
            from modules import sd_vae

            info = getattr(self.m, "sd_checkpoint_info", None)
            sha = info.calculate_shorthash() if info is not None else None
            h = hashlib.sha256(b"a1111-dreambooth-fingerprint-1")
            h.update(f"{sha or getattr(self.m, 'sd_model_hash', '')}:{self.prediction_type}".encode())
            h.update(str(getattr(sd_vae, "loaded_vae_file", None) or "").encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def base_fingerprint(self) -> str:
        """weights_fingerprint of the UNet's own weights: where the WebUI has a LoRA applied in place,
        its backup of the weight (the WebUI and ComfyUI hold the same ldm names, so both agree)."""
        from dreambooth_core.adapters.metadata import weights_fingerprint

        unet = self.m.model.diffusion_model
        state = dict(unet.state_dict())
        for name, module in unet.named_modules():
            backup = getattr(module, "network_weights_backup", None)
            if torch.is_tensor(backup) and f"{name}.weight" in state:
                state[f"{name}.weight"] = backup
        return weights_fingerprint(state)

    def describe(self) -> str:
        info = getattr(self.m, "sd_checkpoint_info", None)
        return f"Automatic1111 {getattr(info, 'title', 'checkpoint')}"

    def _clip(self):
        return getattr(self.m.cond_stage_model, "wrapped", self.m.cond_stage_model)

    def _text_embedders(self) -> List[nn.Module]:
        """The WebUI's text-encoder wrappers: SD1/SD2's one, SDXL's two (CLIP-L, OpenCLIP-G) in file order."""
        if self.is_sdxl:
            return [e for e in self.m.conditioner.embedders if hasattr(e, "wrapped")]
        return [self.m.cond_stage_model]

    def tokenizers(self) -> list:
        out = []
        for embedder in self._text_embedders():
            tok = getattr(getattr(embedder, "wrapped", embedder), "tokenizer", None)
            if tok is not None and hasattr(tok, "get_vocab"):
                out.append(tok)
            else:
                import open_clip

                out.append(OpenClipTokenizer(open_clip.tokenizer._tokenizer))
        return out

    # -- encoding ------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str], *, size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        return conditioning_parts(self.m.get_learned_conditioning(prompt_batch(prompts, size)))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = pixels.to(self.device, self._vae_dtype())
            if self.is_sdxl:  # its encode_first_stage samples the posterior; the core wants it reproducible
                fsm = self.m.first_stage_model
                return (fsm.quant_conv(fsm.encoder(x)).chunk(2, dim=1)[0] * self.m.scale_factor).float()
            out = self.m.encode_first_stage(x)
        if torch.is_tensor(out):  # reForge: the latent, scaled already, an inference tensor (not a posterior:
            return owned(out).float()  # Tensor.mode is another thing)
        return (out.mode() * self.m.scale_factor).float()

    def _vae_dtype(self) -> torch.dtype:
        return next(self.m.first_stage_model.parameters()).dtype

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            images = self.m.decode_first_stage(latents.to(self.device, self._vae_dtype()))
        return owned(images).float().clamp(-1, 1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        dtype, dev = self.weight_dtype, self.device
        context = cond["context"].to(dev, dtype)
        if self.is_sdxl:  # sgm's DiffusionEngine takes the conditioner's dict
            context = {"crossattn": context, "vector": cond["vector"].to(dev, dtype)}
        out = self.m.apply_model(noisy.to(dev, dtype), timesteps.to(dev).long(), context)
        return out.float()

    # -- training surface ----------------------------------------------------------------------
    def _text_encoder_targets(self) -> Dict[str, nn.Module]:
        """kohya name -> module in the text encoders (SDXL's OpenCLIP through open_clip_lora, whose attention
        forwards are installed here for the run; and, since SDXL's conditioner encodes text without
        gradients unless an embedder is trainable, both embedders marked trainable for the run)."""
        embedders = self._text_embedders()
        if not self.is_sdxl:
            return clip_lora_targets(self._clip().transformer.text_model.encoder.layers)
        clip_l, clip_g = (e.wrapped for e in embedders)
        targets = clip_lora_targets(clip_l.transformer.text_model.encoder.layers, "lora_te1")
        more, forwards = open_clip_lora_targets(clip_g.model.transformer.resblocks, "lora_te2")
        targets.update(more)
        for attention, forward in forwards:
            self._set(attention, "forward", forward)
        for embedder in embedders:
            self._set(embedder, "is_trainable", True)
        return targets

    def _set(self, obj, name: str, value, into: Optional[list] = None) -> None:
        """Set an attribute for the run only (release(), or _unset of `into`, puts back what was there)."""
        (self._patches if into is None else into).append((obj, name, vars(obj).get(name, _ABSENT)))
        setattr(obj, name, value)

    def lora_targets(self, unet: bool, text_encoder: bool, conv: bool = False) -> Dict[str, nn.Module]:
        targets: Dict[str, nn.Module] = {}
        if unet:
            targets.update(unet_lora_targets(self.m.model.diffusion_model, conv))
        if text_encoder:
            targets.update(self._text_encoder_targets())
        self._freeze()
        self._targets.update(targets)
        return targets

    def _roots(self) -> List[nn.Module]:
        return [self.m.model.diffusion_model] + ([self._clip().transformer] if self.train_text_encoder else [])

    def _freeze(self) -> None:
        """The shared weights never collect gradients in LoRA mode (flags restored by release())."""
        if self._grad_flags:
            return
        for root in [self.m.model.diffusion_model] + [getattr(e, "wrapped", e) for e in self._text_embedders()]:
            for p in root.parameters():
                self._grad_flags.append((p, p.requires_grad))
                p.requires_grad_(False)

    def trainable_models(self, unet: bool, text_encoder: bool) -> List[nn.Module]:
        if self._containers is None:
            if self.mode == "full":
                roots = self._roots()
                # Put the loaded weights back after the run: the WebUI keeps using this model.
                self._backup = {f"{i}.{k}": v.detach().to("cpu", copy=True)
                                for i, r in enumerate(roots) for k, v in r.state_dict().items()}
                self._backup_dtypes = [next(r.parameters()).dtype for r in roots]  # the trainer casts to fp32
                self._containers = roots
            else:
                adapters = [getattr(m, ADAPTER_ATTR) for m in self._targets.values() if hasattr(m, ADAPTER_ATTR)]
                # One container: old accelerate (the WebUI's 0.21) accumulates over one model.
                self._containers = [nn.ModuleList(adapters)] if adapters else []
        if self.mode == "full":
            return ([self._containers[0]] if unet else []) + (self._containers[1:] if text_encoder else [])
        return list(self._containers) if unet else []

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """The WebUI's own switch (the one its embedding/hypernetwork training uses) for its ldm UNet; SDXL's
        (generative-models') UNet has none there, so its blocks are checkpointed as in Forge."""
        if self.is_sdxl:
            if enabled and not self._checkpointing:
                for block in unet_blocks(self.m.model.diffusion_model):
                    self._set(block, "forward", functools.partial(checkpointed, block.forward), self._block_patches)
            elif not enabled:
                self._unset(self._block_patches)
        else:
            from modules import sd_hijack_checkpoint

            (sd_hijack_checkpoint.add if enabled else sd_hijack_checkpoint.remove)()
        self._checkpointing = enabled

    def _unset(self, patches: Optional[list] = None) -> None:
        """Put back the attributes _set changed (into `patches`), newest first."""
        patches = self._patches if patches is None else patches
        while patches:
            obj, name, previous = patches.pop()
            if previous is _ABSENT:
                vars(obj).pop(name, None)
            else:
                setattr(obj, name, previous)

    def release(self) -> None:
        """Undo every change made to the shared model: adapters, grad flags, full-tune weights."""
        if self._checkpointing:
            self.set_gradient_checkpointing(False)
        for module in self._targets.values():
            adapter = getattr(module, ADAPTER_ATTR, None)
            if adapter is not None:
                adapter.detach_from(module)
        self._targets.clear()
        self._unset()
        if self._backup is not None:
            with torch.no_grad():
                for i, root in enumerate(self._roots()):
                    root.to(self._backup_dtypes[i])
                    for k, v in root.state_dict().items():
                        v.copy_(self._backup[f"{i}.{k}"])
                    root.eval()
            self._backup = None
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self._grad_flags.clear()

    # -- sampling ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], settings, progress=None) -> List[np.ndarray]:
        return txt2img_images(self.m, prompts, seeds, settings, progress)

    # -- around the job ------------------------------------------------------------------------
    def begin_job(self, optimized: bool) -> None:
        """Before class images and training: the LoRAs of the last prompt released, and (unless the user
        opted in) the WebUI's attention optimisations undone, as for its own embedding training."""
        clear_active_loras()
        if not optimized:
            _attention_switch("undo_optimizations")

    def end_job(self, optimized: bool) -> None:
        if not optimized:
            _attention_switch("apply_optimizations")

    # -- full fine-tune ------------------------------------------------------------------------
    def save_full(self, path: str, metadata: Optional[Dict[str, str]] = None) -> List[str]:
        """The whole checkpoint in the WebUI's own (ldm) layout, fp16, loadable from models/Stable-diffusion."""
        out = path if path.endswith(".safetensors") else path + ".safetensors"
        # The WebUI's hijack wraps the text encoder (`cond_stage_model.wrapped.…`, `token_embedding.wrapped`):
        # keys are written as in the checkpoint it loaded.
        tensors = {k.replace(".wrapped.", "."): v.detach().to("cpu", torch.float16 if v.is_floating_point()
                                                              else v.dtype)
                   for k, v in self.m.state_dict().items()}
        fileio.save_tensors(out, tensors, metadata or {"dreambooth_base_model": self.describe()})
        return [out]


def txt2img_images(sd_model, prompts: Sequence[str], seeds: Sequence[int], settings,
                   progress=None) -> List[np.ndarray]:
    """txt2img through the WebUI's processing (A1111's and Forge's alike), one image per seed."""
    from modules import processing, sd_samplers, shared

    if len(prompts) != len(seeds):
        raise ValueError("generate: one seed per prompt")
    name, _, scheduler = str(settings.sampler or DEFAULT_SAMPLER).partition(":")
    if sd_samplers.find_sampler_config(name) is None:
        raise ValueError(f"sampler {name!r} is not one of the WebUI's samplers "
                         f"(e.g. {DEFAULT_SAMPLER!r}, 'Euler a')")
    images: List[np.ndarray] = []
    for prompt, seed in zip(prompts, seeds):
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=sd_model, prompt=prompt, negative_prompt=settings.negative_prompt, seed=int(seed),
            steps=int(settings.steps), cfg_scale=float(settings.guidance), width=int(settings.width),
            height=int(settings.height), sampler_name=name, scheduler=scheduler or None, batch_size=1,
            n_iter=1, do_not_save_samples=True, do_not_save_grid=True)
        try:
            processed = processing.process_images(p)
        finally:
            p.close()
        if shared.state.interrupted or not processed.images:  # a half-sampled image is not kept
            raise Interrupted("image generation was interrupted")
        images.append(np.asarray(processed.images[0].convert("RGB"), dtype=np.uint8))
        if progress is not None:
            progress(len(images), len(prompts))
    return images


def clear_active_loras() -> None:
    """Forget the LoRAs of the last txt2img prompt (the WebUI's Lora support keeps them applied to the weights
    until the next generation), so that training starts from the checkpoint itself. Every host's loader
    takes `load_networks(names, te_multipliers, unet_multipliers, dyn_dims)`; Forge's and reForge's zip the
    multipliers, so `load_networks([])` alone raises TypeError there: the lists are given (empty)."""
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "load_networks"):
        networks.load_networks([], [], [], None)


def _attention_switch(name: str) -> None:
    """A1111's module-level `sd_hijack.undo_optimizations` / `apply_optimizations` (the attention
    optimisations its own embedding training turns off); reForge and Forge have no such switch (their
    attention is their backend's; the functions are commented out), so there is nothing to turn."""
    from modules import sd_hijack

    switch = getattr(sd_hijack, name, None)
    if switch is not None:
        switch()
