"""The "forge" backend: dreambooth_core's Backend protocol on a Forge-family WebUI's loaded model.

lllyasviel's Forge (and Forge Neo, which keeps the design) holds a `ForgeDiffusionEngine`, not A1111's
ldm model (../shared/FORGE_NOTES.md). What that changes, and how this backend meets it:

1. The parts live under `sd_model.forge_objects`: the UNet is `forge_objects.unet.model.diffusion_model`
   (ldm layout, so LoRA names are the A1111 backend's, names.py), ᾱ_t and ε/v come from the `KModel`'s
   `predictor`; the text encoders are `forge_objects.clip.cond_stage_model.clip_l|clip_h|clip_g`.
2. The host's `KModel.apply_model` works in k-diffusion terms (σ in, x0 out). `predict` calls the
   UNet itself, as `apply_model` does inside: the core's VP input sqrt(ᾱ)x0 + sqrt(1-ᾱ)ε is exactly
   `predictor.calculate_input(σ, x0 + σε)`, and the timestep is `predictor.timestep(σ)` = t. The raw
   ε or v comes back (no `calculate_denoised`).
3. `get_learned_conditioning`, `encode_first_stage` and `decode_first_stage` run under
   `torch.inference_mode`: their results are cloned into ordinary tensors; the latents come back already
   scaled. When the text encoder trains, the engine's own conditioning code runs without its
   inference-mode decorator (`__wrapped__`), so captions are still encoded exactly as prompts are.
   The loaded weights are inference tensors too: LoRAs train through dreambooth_core.adapters.frozen
   (the host's forward, dL/dx from the weight read again in backward through Forge's own
   `get_weight_and_bias`, the LoRA added to the output); the few other frozen tensors a backward keeps
   (norm scales) are swapped for ordinary copies during the run. No Linear or convolution weight is copied.
4. The model is a placeholder until Forge loads it at the first generation: loaded.loaded_model()
   asks Forge to load the selected checkpoint first.
5. Forge has its own memory manager: the UNet (and the text encoder when it trains) are loaded through
   `backend.memory_management.load_models_gpu` before each step, as Forge's sampler loads them, so
   --always-cpu, low-VRAM offloading and the models txt2img swaps in between are all Forge's business.
6. Forge has its own LoRA loader (`extensions-builtin/sd_forge_lora`, patching weights in place through
   each patcher's `LoraLoader`): the LoRAs of the last prompt are released through it and their patches
   taken off the weights before training, so the run starts from the checkpoint itself. The file's keys
   are the kohya names Forge's loader maps (`model_lora_keys_unet` / `_clip`), every one of them.

SD1.x, SD2.x (ε and v) and SDXL train, and so do Flux (dev, schnell), Chroma and SD3.5, Forge's
flow-matching engines (forge_flow.py: the velocity on the predictor's own shifted σ, the text encoders frozen,
the LoRA on the transformer's blocks). Which path trains is decided by the engine's class. Every other engine
Forge loads (the SDXL refiner, inpainting models, quantized UNets) is refused with its name before any
work. LoRA only: the weights are inference tensors, which a full fine-tune cannot train in place.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from dreambooth_core.adapters.frozen import FrozenForward, frozen_patchable
from dreambooth_core.backends.base import BackendDefaults, UnsupportedModel

from . import forge_flow as flow
from .backend import clear_active_loras, txt2img_images
from .common import checkpointed, conditioning_parts, owned, prompt_batch, unet_blocks, unet_inputs
from .names import clip_lora_targets, unet_lora_targets

log = logging.getLogger("dreambooth")
TRAINS = "SD1.x, SD2.x (ε and v), SDXL, Flux (dev, schnell), Chroma and SD3.5"
#: engine class -> (family, text encoders in the LoRA file's order)
ENGINES = {"StableDiffusion": ("sd1", ("clip_l",)), "StableDiffusion2": ("sd2", ("clip_h",)),
           "StableDiffusionXL": ("sdxl", ("clip_l", "clip_g"))}
FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16)


def _read_weight(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The weight as Forge's forward uses it (its scale and online LoRAs included), cast like `like`."""
    try:
        from backend.operations import get_weight_and_bias
    except ImportError:  # not inside Forge (the core's plain read)
        return module.weight.to(device=like.device, dtype=like.dtype)
    return get_weight_and_bias(module, dict(device=like.device, dtype=like.dtype))[0]


class _FreshInput:
    """A LayerNorm of Forge's UNet on a copy of its input while gradients flow. Forge's transformer block
    adds to its residual stream in place (`x += n` after `n = attn1(norm1(x))`), which overwrites the
    tensor the norm saved for backward: harmless in inference, an autograd error in training. The copy
    is what an out-of-place residual (ComfyUI's `x = n + x`) would allocate anyway."""

    def __init__(self, module: nn.Module):
        self.host_forward = module.forward

    def __call__(self, x, *args, **kwargs):
        if torch.is_grad_enabled() and x.requires_grad:
            x = x.clone()
        return self.host_forward(x, *args, **kwargs)


class ForgeBackend(BackendDefaults):
    """The Forge WebUI's loaded engine, as dreambooth_core sees a model."""

    def __init__(self, sd_model, *, mode: str = "lora", train_text_encoder: bool = False):
        self.m = sd_model
        kind = type(sd_model).__name__
        what = f"{kind} ({type(sd_model).__module__})"
        self.flow_engine = flow.FLOW_ENGINES.get(kind)
        self.flow = self.flow_engine is not None
        if kind not in ENGINES and not self.flow:
            raise UnsupportedModel(f"the loaded checkpoint is a {what} model; DreamBooth in Forge trains {TRAINS} "
                                   f"checkpoints: load one of those")
        if getattr(sd_model, "is_inpaint", False):
            raise UnsupportedModel(f"the loaded checkpoint is an inpainting {kind} model (its UNet takes a mask and "
                                   f"a masked image too); DreamBooth in Forge trains {TRAINS} text-to-image "
                                   "checkpoints: load the base model")
        if self.flow:
            self.family, self.encoder_names = flow.flow_family(sd_model), self.flow_engine.tokenizers
        else:
            self.family, self.encoder_names = ENGINES[kind]
        self.kmodel = sd_model.forge_objects.unet.model
        storage = getattr(self.kmodel, "storage_dtype", torch.float32)
        if storage not in FLOAT_STORAGE and not (isinstance(storage, torch.dtype) and storage.is_floating_point):
            raise UnsupportedModel(f"the loaded {kind} UNet is stored as {storage} (quantized); LoRA training needs "
                                   "its weights in fp32, fp16, bf16 or fp8: load the checkpoint unquantized "
                                   "(Diffusion in Low Bits: Automatic)")
        predictor = self.kmodel.predictor
        ptype = getattr(predictor, "prediction_type", None)
        if self.flow:
            self.flow_shift = flow.flow_shift(predictor, self.flow_engine)
        elif type(predictor).__name__ != "Prediction" or ptype not in ("epsilon", "v_prediction"):
            raise UnsupportedModel(f"the loaded {kind} model samples with {type(predictor).__name__} "
                                   f"({ptype}); only the discrete ε and v-prediction schedules train here")
        if mode != "lora":
            raise ValueError(f"mode {mode!r}: Forge holds the loaded weights as inference tensors, which a full "
                             "fine-tune cannot train in place; choose mode 'lora'")
        self.class_sampling = flow.CLASS_SAMPLING.get(self.family, {})
        if self.flow:
            flow.refuse_text_encoder(self.flow_engine, train_text_encoder)
            self.prediction_type = "flow"
            self.alphas_cumprod = None  # a flow model trains on schedule(), not on ᾱ
            self.native_resolution = 1024
        else:
            self.prediction_type = ptype
            self.alphas_cumprod = predictor.alphas_cumprod.detach().float().cpu().clone()
            self.native_resolution = {"sdxl": 1024, "sd2": 768 if ptype == "v_prediction" else 512}.get(self.family, 512)
        self.latent_factor = 8
        self.mode = mode
        self.train_text_encoder = bool(train_text_encoder)
        if self.train_text_encoder and not hasattr(type(sd_model).get_learned_conditioning, "__wrapped__"):
            raise UnsupportedModel("train_text_encoder: this Forge's conditioning cannot run with gradients; turn it "
                                   "off (the UNet LoRA still binds the identifier)")
        self._targets: Dict[str, nn.Module] = {}
        self._network = None
        self._container: Optional[nn.ModuleList] = None
        self._patches: List[Tuple[nn.Module, object]] = []  # (module, its previous instance forward)
        self._checkpoint_mark: Optional[int] = None
        self._swapped: List[Tuple[nn.Module, str, torch.Tensor]] = []
        self._grad_flags: List[Tuple[nn.Parameter, bool]] = []
        self._installed = False
        self._last_shape: Optional[list] = None
        self._fingerprint: Optional[str] = None

    def schedule(self):
        """Rectified flow with the predictor's own shift for the flow engines; the discrete ᾱ schedule otherwise."""
        if not self.flow:
            return super().schedule()
        from dreambooth_core.training.objective import FlowSchedule

        return FlowSchedule(shift=self.flow_shift)

    # -- identity ------------------------------------------------------------------------------
    @property
    def diffusion_model(self) -> nn.Module:
        return self.kmodel.diffusion_model

    @property
    def device(self) -> torch.device:
        return torch.device(self.m.forge_objects.unet.load_device)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype Forge computes the UNet in."""
        return self.kmodel.computation_dtype

    def fingerprint(self) -> str:
        """The checkpoint's sha256 (Forge caches it), the modules loaded beside it (VAE, text encoders) and
        the prediction type: the same after a restart, unaffected by LoRAs the WebUI applied."""
        if self._fingerprint is None:
            from modules import sd_models

            info = getattr(self.m, "sd_checkpoint_info", None)
            sha = info.calculate_shorthash() if info is not None else None
            extra = getattr(getattr(sd_models, "model_data", None), "forge_loading_parameters", {}) or {}
            h = hashlib.sha256(b"forge-dreambooth-fingerprint-1")
            h.update(f"{sha or getattr(self.m, 'sd_model_hash', '')}:{self.prediction_type}".encode())
            h.update(repr(sorted(map(str, extra.get("additional_modules", []) or []))).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def base_fingerprint(self) -> str:
        """weights_fingerprint of the UNet's own weights (begin_job took any applied LoRA off them)."""
        from dreambooth_core.adapters.metadata import weights_fingerprint

        return weights_fingerprint(self.diffusion_model.state_dict())

    def describe(self) -> str:
        info = getattr(self.m, "sd_checkpoint_info", None)
        return f"Forge {getattr(info, 'title', type(self.m).__name__)}"

    def _encoders(self) -> List[Tuple[str, nn.Module]]:
        csm = self.m.forge_objects.clip.cond_stage_model
        return [(name, getattr(csm, name)) for name in self.encoder_names]

    def tokenizers(self) -> list:
        tok = self.m.forge_objects.clip.tokenizer
        return [getattr(tok, name) for name in self.encoder_names]

    # -- memory manager ------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        """The UNet (and the text encoder when it trains) on the compute device, through Forge's memory
        manager, as its sampler loads them; nothing happens when they are already there."""
        from backend import memory_management as mm

        patchers = [self.m.forge_objects.unet] + ([self.m.forge_objects.clip.patcher] if self.train_text_encoder else [])
        loaded = getattr(mm, "current_loaded_models", [])
        if all(any(getattr(lm, "model", None) is p for lm in loaded) for p in patchers):
            return
        shape = self._last_shape or [2, 4, self.native_resolution // 8, self.native_resolution // 8]
        mm.load_models_gpu(patchers, memory_required=self.m.forge_objects.unet.memory_required(shape) * 3)

    # -- encoding ------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str], *, size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        texts = prompt_batch(prompts, size)  # SDXL's size conditioning
        if self.flow:
            return flow.flow_conditioning(self.m.get_learned_conditioning(texts))
        if self.train_text_encoder and torch.is_grad_enabled():
            self._ensure_loaded()
            cond = type(self.m).get_learned_conditioning.__wrapped__(self.m, texts)  # the same code, with grad
        else:
            cond = self.m.get_learned_conditioning(texts)
        return conditioning_parts(cond)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.m.encode_first_stage(pixels.to(self.device, torch.float32))  # scaled already
        return owned(z).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            images = self.m.decode_first_stage(latents.to(self.device, torch.float32))
        return owned(images).float().clamp(-1, 1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        self._last_shape = list(noisy.shape)
        self._ensure_loaded()
        if self.flow:  # timesteps are σ
            return flow.predict_velocity(self.kmodel, noisy, timesteps, cond, self.device)
        dev, dtype = self.device, self.weight_dtype
        out = self.diffusion_model(noisy.to(dev, dtype), timesteps.to(dev).float(), control=None,
                                   transformer_options={}, **unet_inputs(cond, dev, dtype))
        return out.float()

    # -- training surface ----------------------------------------------------------------------
    def lora_targets(self, unet: bool, text_encoder: bool, conv: bool = False) -> Dict[str, nn.Module]:
        targets: Dict[str, nn.Module] = {}
        if unet and self.flow:
            targets.update(flow.flow_lora_targets(self.diffusion_model, self.flow_engine))
        elif unet:
            targets.update(unet_lora_targets(self.diffusion_model, conv))
        if text_encoder:
            encoders = self._encoders()
            for name, enc in encoders:
                prefix = "lora_te" if len(encoders) == 1 else {"clip_l": "lora_te1", "clip_g": "lora_te2"}[name]
                targets.update(clip_lora_targets(enc.transformer.text_model.encoder.layers, prefix))
        self._targets.update(targets)
        return targets

    def _roots(self) -> List[nn.Module]:
        return [self.diffusion_model] + ([enc for _, enc in self._encoders()] if self.train_text_encoder else [])

    def attach_lora(self, network) -> None:
        """The adapters on the compute device, added to the outputs of their frozen modules."""
        self._ensure_loaded()  # the weights where the memory manager puts them for training
        for adapter in network.adapters.values():
            adapter.to(self.device)
        self._network = network
        self._install({id(self._targets[name]): adapter for name, adapter in network.adapters.items()})

    def _install(self, adapters: Dict[int, nn.Module]) -> None:
        """Every frozen Linear and convolution of the trained models through FrozenForward (its LoRA where
        it has one); the other frozen inference tensors (norms) swapped for ordinary copies; no weight
        collects a gradient. All undone by release()."""
        if self._installed:
            return
        self._installed = True
        patched = set()
        for root in self._roots():
            for p in root.parameters():
                self._grad_flags.append((p, p.requires_grad))
                p.requires_grad_(False)
            for module in root.modules():
                if id(module) not in patched and frozen_patchable(module):
                    self._patch(module, FrozenForward(module, adapters.pop(id(module), None), _read_weight))
                    patched.add(id(module))
        for module in self.diffusion_model.modules():
            if isinstance(module, nn.LayerNorm) and not self.flow:  # the flow blocks add out of place
                self._patch(module, _FreshInput(module))
        if adapters:
            raise RuntimeError(f"{len(adapters)} LoRA targets are not plain Linears or convolutions; cannot train them")
        with torch.inference_mode(False):
            for root in self._roots():
                for module in root.modules():
                    if id(module) in patched or isinstance(module, nn.Embedding):  # an embedding keeps no weight
                        continue
                    for name, t in list(module._parameters.items()):
                        if t is not None and t.is_inference():
                            self._swapped.append((module, name, t))
                            module._parameters[name] = nn.Parameter(t.clone(), requires_grad=False)

    def _patch(self, module: nn.Module, forward) -> None:
        self._patches.append((module, vars(module).get("forward")))
        module.forward = forward

    def _unpatch(self, count: int) -> None:
        while len(self._patches) > count:
            module, previous = self._patches.pop()
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous

    def trainable_models(self, unet: bool, text_encoder: bool) -> List[nn.Module]:
        if self._container is None:
            if self._network is None:
                return []
            # One container: accelerate accumulates over one model.
            self._container = nn.ModuleList(list(self._network.adapters.values()))
        return [self._container] if unet else []

    def set_gradient_checkpointing(self, enabled) -> None:
        """Checkpoint the UNet's (or the transformer's) blocks (Forge has no switch of its own: its
        sd_hijack_checkpoint is empty)."""
        if enabled and self._checkpoint_mark is None:
            self._checkpoint_mark = len(self._patches)
            blocks = flow.flow_blocks(self.diffusion_model, self.flow_engine) if self.flow else \
                unet_blocks(self.diffusion_model)
            for block in blocks:
                self._patch(block, functools.partial(checkpointed, block.forward))
        elif not enabled and self._checkpoint_mark is not None:
            self._unpatch(self._checkpoint_mark)
            self._checkpoint_mark = None

    def release(self) -> None:
        """Undo every change made to the shared model: patched forwards (with the adapters), swapped
        tensors (where the memory manager moved a module since, the copy stays: same values), grad flags."""
        self.set_gradient_checkpointing(False)
        self._unpatch(0)
        while self._swapped:
            module, name, original = self._swapped.pop()
            current = module._parameters.get(name)
            if current is None or current.device == original.device:
                module._parameters[name] = original
        with torch.inference_mode():  # flags of inference tensors are set there
            for p, flag in self._grad_flags:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
        self._grad_flags.clear()
        self._installed = False

    # -- around the job ------------------------------------------------------------------------
    def begin_job(self, optimized: bool) -> None:
        """Train on the checkpoint itself: the LoRAs of the last prompt released through Forge's loader
        (`networks.load_networks` with no names), and the patches it merged into the weights taken off
        (`refresh_loras` with no patches puts back its backups). Forge has no attention hijack to undo."""
        clear_active_loras()
        fo = self.m.forge_objects
        for patcher in (fo.unet, fo.clip.patcher):
            if not getattr(patcher, "lora_patches", None) and hasattr(patcher, "refresh_loras"):
                patcher.refresh_loras()

    def end_job(self, optimized: bool) -> None:
        pass

    # -- sampling ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], settings, progress=None) -> List[np.ndarray]:
        """txt2img through Forge's processing (with the training LoRA, when attached, in the outputs)."""
        return txt2img_images(self.m, prompts, seeds, settings, progress)

    def save_full(self, path: str, metadata: Optional[Dict[str, str]] = None) -> List[str]:
        raise ValueError("full fine-tuning does not run in Forge; choose mode 'lora'")
