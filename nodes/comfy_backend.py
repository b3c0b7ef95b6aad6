"""The "comfy" backend: dreambooth_core's Backend protocol on ComfyUI's own MODEL / CLIP / VAE.

- Never mutates what other nodes share: training runs on `model.clone()` / `clip.clone()`, and
  the adapters enter through the clone's weight wrappers (see adapters.py). The trained MODEL
  returned to the graph is another clone of the input carrying only the trained deltas.
- Loads through the host's memory manager (`comfy.model_management.load_models_gpu`), so --cpu,
  --lowvram and --novram behave as for sampling.
- The noise schedule and the prediction type come from the model's own `model_sampling` object
  (SD1.x, SD2.x ε and v, SDXL). `predict` returns the denoiser's raw ε or v at integer timesteps:
  the core's VP input sqrt(ᾱ)x0 + sqrt(1-ᾱ)ε is exactly what ComfyUI feeds the UNet
  (`calculate_input` of x0 + σε with σ = sqrt((1-ᾱ)/ᾱ)), so the UNet is called the way
  `BaseModel._apply_model` calls it, without the final `calculate_denoised`.
- Flow-matching transformers (Flux dev/schnell, Flux 2, SD3/SD3.5, Chroma, Lumina 2, Z-Image, Qwen-Image,
  AuraFlow, HunyuanImage 2.1, HiDream, Omnigen2, Cosmos Predict2; families.py tells them from the host's
  detection and refuses every other family) train with `FlowSchedule(shift)`, the shift read from their
  `model_sampling` (Cosmos's RFlow: unshifted, up to its sigma_max's point; flow_path converts to its
  coordinates). `predict` gets σ and returns the raw velocity: the host's own `extra_conds` make the model's
  inputs from the text (pooled `y`, Flux dev's `guidance` at the host's default 3.5 as kohya trains it,
  Lumina 2's mask and `num_tokens`), then
  `_apply_model`'s pieces run (input, timestep, dtype casts, `process_timestep`, the diffusion model)
  without the final `calculate_denoised` (x − σ·v): no division by σ (flow_path.py). A MODEL whose options
  wrap `apply_model` goes through `apply_model` itself and v = (x − denoised)/σ. The frozen Linears run the
  host's forward but pass gradients from the weight read again in backward
  (dreambooth_core.adapters.frozen), and the LoRA is added to their output: no copy of the transformer's
  weights, frozen or patched, exists while it trains. A UNet's LoRA trains the same way (its Linears and
  convolutions through FrozenForward).
- Discrete-schedule transformers (PixArt α/Σ: ε; Hunyuan-DiT: v) take the transformer path on the discrete
  schedule: ε or v at integer timesteps, the core's input scaled to the host's x0 + σε by √(1+σ²) and passed
  through the same host pieces; their diffusion model returns only the ε / v channels of its learned-σ output.
- Samples with the host's KSampler machinery (`comfy.sample.sample`); image i depends only on its
  seed (noise from `comfy.sample.prepare_noise`, one image per call), so a class image equals
  what a stock KSampler makes with that seed.
- Stable Cascade's stage C (the prior; families.py) takes the transformer path on its discrete schedule:
  ε on the host's StableCascadeSampling table at shift 1 (_training_sigmas), its inputs (clip_text,
  clip_text_pooled, clip_img) from `extra_conds`, latents of 42 pixels a cell as the host's StageC
  nodes make them. Its VAE decodes only the previewer's sketch: `generate` returns that (what the stock
  VAEDecode shows) and, for the class-image cache, the sampled latents themselves (`class_latents`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..dreambooth_core.backends.base import BackendDefaults, UnsupportedModel
from . import families
from .flow_path import FlowModelPath
from .adapters import FRESH_COPY, DiffWeight, FrozenState, LoRAWeight, comfy_op_modules, text_targets, unet_targets

log = logging.getLogger("dreambooth")


class _SentencePieceView:
    """The host's SentencePiece tokenizer (Lumina 2's Gemma, AuraFlow's Pile-T5), seen as the identifier
    check reads a transformers tokenizer: `tokenize` into pieces, `get_vocab`, `convert_tokens_to_ids`,
    and `encode` / `decode`, by which suggestions are checked to read back as themselves."""

    def __init__(self, spiece):
        self.spiece = spiece

    def tokenize(self, text: str) -> list:
        return self.spiece.tokenizer.encode(text, out_type=str, add_bos=False, add_eos=False)

    def get_vocab(self) -> dict:
        return self.spiece.get_vocab()

    def convert_tokens_to_ids(self, piece: str) -> int:
        return self.spiece.tokenizer.piece_to_id(piece)

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        return self.spiece.tokenizer.encode(text, add_bos=add_special_tokens, add_eos=add_special_tokens)

    def decode(self, ids: list) -> str:
        return self.spiece.tokenizer.decode(ids)


class _BytePairView:
    """The host's own byte-level BPE (`comfy.text_encoders.bpe_tokenizer.BPETokenizer`: Flux 2's Mistral
    tekken tokenizer, called with a text, giving ids), seen as the identifier check reads a transformers
    tokenizer (see _SentencePieceView)."""

    def __init__(self, bpe):
        self.bpe = bpe
        self._pieces = {i: p for p, i in bpe.get_vocab().items()}

    def tokenize(self, text: str) -> list:
        return [self._pieces[i] for i in self.encode(text)]

    def get_vocab(self) -> dict:
        return self.bpe.get_vocab()

    def convert_tokens_to_ids(self, piece: str) -> int:
        return self.bpe.get_vocab()[piece]

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        ids = self.bpe(text)["input_ids"]
        bos = getattr(self.bpe, "_bos_id", None)
        return ids[1:] if not add_special_tokens and bos is not None and ids[:1] == [bos] else ids

    def decode(self, ids: list) -> str:
        return self.bpe.decode(ids)


def clip_tokenizers(clip) -> list:
    """The tokenizers inside a ComfyUI CLIP the identifier is checked in: its CLIP tokenizers (clip_l;
    clip_l and clip_g for SDXL and SD3), else its T5 (Chroma), SentencePiece (Lumina 2, AuraFlow),
    Qwen2 (Qwen-Image, HunyuanImage 2.1, Z-Image, Omnigen2) or Mistral tekken (Flux 2) one."""
    if clip is None:
        raise ValueError("no CLIP connected: the identifier token is checked with the model's tokenizer")
    found = []
    for value in vars(clip.tokenizer).values():
        inner = getattr(value, "tokenizer", None)
        if inner is not None and hasattr(inner, "tokenize") and hasattr(inner, "get_vocab"):
            found.append(inner)
        elif inner is not None and hasattr(inner, "get_vocab") and hasattr(getattr(inner, "tokenizer", None), "encode"):
            found.append(_SentencePieceView(inner))
        elif inner is not None and hasattr(inner, "get_vocab") and callable(inner) and hasattr(inner, "decode"):
            found.append(_BytePairView(inner))
    # Beside CLIP, Flux and SD3 tokenize for T5, whose SentencePiece splits the usual rare identifiers
    # ("sks" in 4 pieces): the identifier is checked in the CLIP tokenizers where the model has any.
    clip_like = [t for t in found if "clip" in type(t).__name__.lower()]
    # A byte-level tokenizer beside the prompt's (HunyuanImage 2.1's ByT5, which reads only quoted text)
    # splits every word into bytes: the identifier is checked in the others.
    words = [t for t in found if len(t.get_vocab()) >= 1000]
    found = clip_like or words or found
    if not found:
        raise UnsupportedModel(f"this CLIP ({type(clip.tokenizer).__name__}) has no tokenizer the identifier can be "
                               f"checked in; DreamBooth trains {families.TRAINS}: connect the CLIP loaded for one of them")
    return found


def _prediction_type(model_sampling, name: str = "model") -> str:
    """ε or v of a discrete-schedule MODEL (SD1/SD2/SDXL, PixArt, Hunyuan-DiT; `name`: its detected class), or
    UnsupportedModel naming what it is."""
    import comfy.model_sampling as ms

    if not isinstance(model_sampling, ms.ModelSamplingDiscrete) or isinstance(model_sampling, ms.ModelSamplingDiscreteEDM):
        raise UnsupportedModel(f"the {name} MODEL samples with {type(model_sampling).__mro__[1].__name__}; "
                               f"{name} trains on its own discrete schedule (DreamBooth trains "
                               f"{families.TRAINS}): connect the model without that sampling patch")
    if len(model_sampling.sigmas) != getattr(model_sampling, "num_timesteps", len(model_sampling.sigmas)):
        raise UnsupportedModel(f"this {name} model samples on a distilled schedule (e.g. LCM); train on the base model")
    if isinstance(model_sampling, ms.EDM) or isinstance(model_sampling, ms.X0):
        raise UnsupportedModel(f"this {name} model's prediction type (EDM / x0) is not supported for training")
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, ms.EPS):
        return "epsilon"
    raise UnsupportedModel(f"this {name} model's prediction type is not supported for training (only ε and v)")


def _training_sigmas(model_sampling) -> torch.Tensor:
    """σ at each integer timestep of the discrete schedule (float32, CPU): the model's own sigmas. Stable
    Cascade's StableCascadeSampling is a cosine schedule in continuous time t ∈ (0, 1] that the host tabulates
    at t = (i + 1)/10⁴ (its `timestep(σ)` gives t back to the model) with the shift it samples with (stage C:
    2) folded in; stage C was trained unshifted (Stability's train_c: `gdf.diffuse(latents, shift=1)`), so
    the table trained on is the host's own at shift 1."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.StableCascadeSampling) and float(model_sampling.shift) != 1.0:
        return _unshifted_cascade_sigmas(float(model_sampling.cosine_s)).clone()
    return model_sampling.sigmas.detach().float().cpu()


@functools.lru_cache(maxsize=2)
def _unshifted_cascade_sigmas(cosine_s: float) -> torch.Tensor:
    """The host's StableCascadeSampling table at shift 1 (made once: the host fills it point by point)."""
    import comfy.model_sampling as ms

    unshifted = ms.StableCascadeSampling()
    if float(unshifted.cosine_s) != cosine_s:
        unshifted.set_parameters(1.0, cosine_s)
    return unshifted.sigmas.detach().float().cpu()


def _tensor_bytes(t: torch.Tensor, n: int = 4096) -> bytes:
    flat = t.detach().reshape(-1)[:n]
    return flat.to(device="cpu", dtype=torch.float32).numpy().tobytes()


def _patcher_digest(h, patcher) -> None:
    """Architecture, a few original weights (not the in-place patched ones of another loaded clone)
    and the patcher's own patches: the same for every load of the same file and LoRA stack."""
    sd = patcher.model.state_dict()
    # Object patches of another loaded clone (e.g. a ModelSamplingDiscrete node) replace attributes
    # of the shared module: read the schedule through this patcher's own view instead.
    keys = sorted(k for k in sd if not k.startswith("model_sampling."))
    sampling = patcher.get_model_object("model_sampling") if hasattr(patcher.model, "model_sampling") else None
    if sampling is not None and torch.is_tensor(getattr(sampling, "sigmas", None)):
        h.update(type(sampling).__name__.encode() + _tensor_bytes(sampling.sigmas, 1000))
    h.update(json.dumps([(k, list(sd[k].shape), str(sd[k].dtype)) for k in keys]).encode())
    # Tensors a checkpoint may lack and the host leaves uninitialised (SD1's unused CLIP
    # text_projection: the host's own checkpoint saver drops it) are not sampled.
    big = [k for k in keys if sd[k].ndim >= 2 and not k.endswith(("text_projection.weight", "logit_scale"))]
    picks = sorted({big[int(i * (len(big) - 1) / 7)] for i in range(8)}) if big else []
    for k in picks:
        backup = patcher.backup.get(k) if hasattr(patcher, "backup") else None
        h.update(k.encode() + _tensor_bytes(backup.weight if backup is not None else sd[k]))
    for k in sorted(getattr(patcher, "patches", {})):
        for p in patcher.patches[k]:
            h.update(f"{k}:{p[0]}:{p[2]}:{p[3]}".encode())
            stack = [p[1]]
            while stack:
                v = stack.pop()
                if torch.is_tensor(v):
                    h.update(_tensor_bytes(v, 256))
                elif isinstance(v, (list, tuple)):
                    stack.extend(v)
                elif hasattr(v, "weights"):
                    stack.extend(v.weights if isinstance(v.weights, (list, tuple)) else [v.weights])
                else:
                    h.update(type(v).__name__.encode())
    for name in sorted(getattr(patcher, "object_patches", {})):
        h.update(name.encode())
        obj = patcher.object_patches[name]
        if hasattr(obj, "sigmas") and torch.is_tensor(obj.sigmas):
            h.update(_tensor_bytes(obj.sigmas, 1000))
        else:
            h.update(repr(obj).encode()[:200])
    if getattr(patcher, "weight_wrapper_patches", None):
        # A trained MODEL from these nodes: its deltas decide its images.
        for k in sorted(patcher.weight_wrapper_patches):
            for w in patcher.weight_wrapper_patches[k]:
                for p in (getattr(getattr(w, "adapter", None), "parameters", lambda: [])() or []):
                    h.update(_tensor_bytes(p, 256))
                if hasattr(w, "diff"):
                    h.update(_tensor_bytes(w.diff, 256))


def _checkpointed(forward, *args, **kwargs):
    """Gradient checkpointing of one block. The block runs on copies of its tensor arguments, so a
    block that updates its input in place cannot corrupt the input checkpointing keeps."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)

    def run(*a, **k):
        return forward(*(x.clone() if torch.is_tensor(x) else x for x in a), **k)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def _clip_layer_forward(layer, x, mask=None, optimized_attention=None):
    """ComfyUI's CLIPLayer residual block, out of place. The host writes `x += attn(norm1(x))`,
    which overwrites the tensor LayerNorm saved for backward: fine for inference, an autograd error
    when the text encoder trains. Same arithmetic, new tensors."""
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


def _text_encoder_layers(cond_stage_model):
    for name in ("clip_l", "clip_h", "clip_g"):
        enc = getattr(cond_stage_model, name, None)
        layers = getattr(getattr(getattr(getattr(enc, "transformer", None), "text_model", None), "encoder", None),
                         "layers", None)
        if layers is not None:
            yield from layers


class _DiffSet(nn.Module):
    """Full-size trainable deltas for every weight/bias ComfyUI casts (full fine-tuning)."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.keys: List[str] = []
        self.diffs = nn.ParameterList()
        for name, module in comfy_op_modules(root):
            for pname in ("weight", "bias"):
                t = getattr(module, pname, None)
                if isinstance(t, torch.Tensor):
                    self.keys.append(f"{name}.{pname}")
                    self.diffs.append(nn.Parameter(torch.zeros(t.shape, dtype=torch.float32, device=t.device)))

    def items(self):
        return zip(self.keys, self.diffs)


class ComfyBackend(FlowModelPath, BackendDefaults):
    """A MODEL/CLIP/VAE triple from a ComfyUI graph, as dreambooth_core sees a model."""

    def __init__(self, model, clip=None, vae=None, *, mode: str = "lora", train_text_encoder: bool = False):
        if model is None:
            raise ValueError("no MODEL connected")
        self.base_model, self.base_clip, self.vae = model, clip, vae
        self.model = model.clone()  # the training patcher: never the MODEL other nodes share
        self.clip = clip.clone() if clip is not None else None
        self.mode = mode
        self.train_text_encoder = bool(train_text_encoder)
        if self.train_text_encoder and clip is None:
            raise ValueError("train_text_encoder is on but no CLIP is connected")
        self._family = families.detect(model)
        self.model_sampling = self.model.get_model_object("model_sampling")
        self._frozen_state: Optional[FrozenState] = None
        self._swapped: List[Tuple[nn.Module, str, torch.Tensor]] = []  # (module, name, original) for the run
        #: bytes of frozen tensors copied for a flow run (norm scales and the like; no Linear weight)
        self.frozen_copied_bytes = 0
        self._kernels_before: Optional[bool] = None  # the host's in_training flag before this run set it
        if self._family.transformer:
            self._refuse_flow_settings(mode)
            self.native_resolution = self._family.native_resolution
        if self._family.flow:
            self.prediction_type = "flow"
            self.flow_shift = families.flow_shift(self.model_sampling)
            self.flow_max_sigma = families.cosmos_max_sigma(self.model_sampling)
            # ᾱ of the flow line x = (1−σ)x0 + σε at 1000 σ (informational: schedule() is what trains)
            sig = torch.linspace(1e-3, 1.0 - 1e-3, 1000)
            self.alphas_cumprod = (1 - sig) ** 2 / ((1 - sig) ** 2 + sig ** 2)
        else:
            self.prediction_type = _prediction_type(self.model_sampling, families.model_class(model))
            #: σ of each integer timestep of the discrete schedule it trains on (the transformer path's input)
            self.schedule_sigmas = _training_sigmas(self.model_sampling)
            self.alphas_cumprod = 1.0 / (1.0 + self.schedule_sigmas ** 2)
            if not self._family.transformer:
                self.native_resolution = self._native_resolution()
        vae_factor = int(vae.spacial_compression_encode()) if vae is not None else 8
        self.latent_factor = self._family.compression or vae_factor
        # Stable Cascade's stage C VAE decodes only the previewer's sketch (stage B and stage A make the image),
        # which does not encode back into the latents it came from: its class samples are kept as latents
        self.class_latents = bool(self._family.compression)
        self._fingerprint: Optional[str] = None
        self._target_keys: Dict[str, Tuple[str, str]] = {}
        self._wrappers: List[Tuple[str, str, object]] = []  # (unet|clip, key, wrapper) trained deltas
        self._network = None
        self._containers: Optional[List[nn.Module]] = None
        self._installed = False
        self._forward_patches: List[Tuple[nn.Module, object]] = []  # (module, its previous instance forward)
        self._checkpoint_mark: Optional[int] = None
        self._result = None
        self._last_shape = None
        #: called (no arguments) at each sampler step inside generate(); nodes set it to drive
        #: their progress bar, whose host hook also raises the interrupt when Cancel was pressed.
        self.sampler_step_hook: Optional[Callable[[], None]] = None

    def _refuse_flow_settings(self, mode: str) -> None:
        name = families.model_class(self.base_model)
        if mode != "lora":
            raise ValueError(f"mode {mode!r}: {name} models train in mode 'lora' only here (full fine-tuning would "
                             "hold a second copy of the transformer and its optimizer state); choose mode 'lora'")
        if self.train_text_encoder:
            raise ValueError(f"train_text_encoder: the text encoders of {name} (CLIP / T5 / Gemma) do not train here "
                             "yet; turn train_text_encoder off (the transformer's LoRA carries the subject)")

    def schedule(self):
        """FlowSchedule with the model's own shift for flow families; the discrete ᾱ schedule otherwise."""
        if not self._family.flow:
            return super().schedule()
        from ..dreambooth_core.training.objective import FlowSchedule

        return FlowSchedule(shift=self.flow_shift, max_sigma=self.flow_max_sigma)

    # -- identity ------------------------------------------------------------------------------
    def _native_resolution(self) -> int:
        import comfy.model_base

        base = self.model.model
        if isinstance(base, comfy.model_base.SDXL) or base.adm_channels >= 2560:
            return 1024
        if self.prediction_type == "v_prediction" and base.model_config.unet_config.get("context_dim") == 1024:
            return 768
        return 512

    @property
    def family(self) -> str:
        import comfy.model_base

        if self._family.transformer:
            return self._family.name
        base = self.model.model
        if isinstance(base, comfy.model_base.SDXL):
            return "sdxl"
        return "sd2" if base.model_config.unet_config.get("context_dim") == 1024 else "sd1"

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.load_device)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(b"comfy-dreambooth-fingerprint-1")
            h.update(type(self.base_model.model.model_config).__name__.encode())
            _patcher_digest(h, self.base_model)
            if self.base_clip is not None:
                h.update(b"clip" + repr(self.base_clip.layer_idx).encode())
                _patcher_digest(h, self.base_clip.patcher)
            if self.vae is not None:
                h.update(b"vae")
                _patcher_digest(h, self.vae.patcher)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def base_fingerprint(self) -> str:
        """What a subject's file records as its base and Load Subject recomputes (model_identity)."""
        from .model_identity import model_fingerprint

        return model_fingerprint(self.base_model)

    def describe(self) -> str:
        return f"ComfyUI {type(self.base_model.model.model_config).__name__} ({self.fingerprint()[:8]})"

    def tokenizers(self) -> list:
        return clip_tokenizers(self.base_clip)

    # -- memory manager ------------------------------------------------------------------------
    def _training_patchers(self) -> list:
        return [self.model] + ([self.clip.patcher] if self.train_text_encoder else [])

    def _ensure_loaded(self) -> None:
        import comfy.model_management as mm

        patchers = self._training_patchers()
        loaded = mm.loaded_models()
        if all(any(p is q for q in loaded) and p.model.current_weight_patches_uuid == p.patches_uuid
               for p in patchers):
            return
        low = mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)
        if low:  # let the host load partially; training still works (weights cast per forward)
            side = self.native_resolution // self.latent_factor  # pixel-space models (Chroma Radiance): factor 1
            channels = self.model.get_model_object("latent_format").latent_channels
            shape = self._last_shape or [2, channels, side, side]
            mm.load_models_gpu(patchers, memory_required=self.model.memory_required(shape) * 3)
        else:  # as the host's own trainer: everything else leaves the device, the model loads whole
            mm.load_models_gpu(patchers, memory_required=1e20, force_full_load=True)

    def set_training_dtype(self, dtype: Optional[torch.dtype]) -> None:
        """Compute dtype of the UNet while training (fp32 on CPU; bf16 or fp32 on a GPU)."""
        if dtype is not None:
            self.model.set_model_compute_dtype(dtype)

    def default_training_dtype(self) -> torch.dtype:
        import comfy.model_management as mm

        dev = self.device
        if mm.is_device_cpu(dev) or self.model.model.get_dtype() == torch.float32:
            return torch.float32
        return torch.bfloat16 if mm.should_use_bf16(dev, prioritize_performance=False) else torch.float32

    # -- encoding ------------------------------------------------------------------------------
    def _encode_tokens(self, tokens):
        if self.train_text_encoder and torch.is_grad_enabled():
            # Differentiable: our clone (with the adapters) must be the loaded CLIP, together with
            # the UNet, so that neither evicts the other at every step.
            self._ensure_loaded()
            csm = self.clip.cond_stage_model
            csm.reset_clip_options()
            if self.clip.layer_idx is not None:
                csm.set_clip_options({"layer": self.clip.layer_idx})
            out = csm.encode_token_weights(tokens)
            return out[0], out[1]
        return self.clip.encode_from_tokens(tokens, return_pooled=True)

    def encode_text(self, prompts: Sequence[str], *, size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        if self.clip is None:
            raise ValueError("no CLIP connected")
        if self._family.transformer:
            return self._encode_flow(prompts)
        contexts, pooled = [], []
        for prompt in prompts:
            tokens = self.clip.tokenize(prompt)
            # One 77-token window, as the diffusers backend truncates: every caption then has the
            # same length and the core can batch cached embeddings.
            tokens = {k: v[:1] for k, v in tokens.items()}
            cond, pool = self._encode_tokens(tokens)
            contexts.append(cond)
            pooled.append(pool)
        out = {"context": torch.cat(contexts)}
        if pooled[0] is not None:
            h, w = size
            y = self.model.model.encode_adm(pooled_output=torch.cat(pooled), width=w, height=h, crop_w=0, crop_h=0,
                                            target_width=w, target_height=h, prompt_type="positive")
            if y is not None:
                out["y"] = y
        return out

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("no VAE connected")
        images = ((pixels.float() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
        c = self._family.compression
        if c:  # as StableCascade_StageC_VAEEncode: the image scaled to (side // compression) · the VAE's ratio
            import comfy.utils

            r = int(self.vae.spacial_compression_encode())
            h, w = images.shape[1:3]
            images = comfy.utils.common_upscale(images.movedim(-1, 1), (w // c) * r, (h // c) * r, "bicubic",
                                                "center").movedim(1, -1)
        latent_format = self.model.get_model_object("latent_format")
        if getattr(self.vae, "latent_dim", 2) == 3:
            # a video autoencoder (Qwen-Image's Wan 2.1) reads a batch as the frames of one video: each image
            # is its own one-frame video, and the core's latents stay [B, C, H, W]
            latents = torch.cat([self.vae.encode(images[i:i + 1]) for i in range(images.shape[0])])
            return latent_format.process_in(latents).float().squeeze(2)
        return latent_format.process_in(self.vae.encode(images)).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = self._host_latents(latents.float())
        images = self.vae.decode(self.model.get_model_object("latent_format").process_out(latents))
        images = images.reshape(-1, *images.shape[-3:])  # a video autoencoder's frames as images
        return (images.movedim(-1, 1) * 2.0 - 1.0).clamp(-1, 1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        self._last_shape = list(noisy.shape)
        self._ensure_loaded()
        if self._family.transformer:
            return self._predict_transformer(noisy, timesteps, cond)
        base = self.model.model
        dev = self.device
        dtype = self.model.get_model_object("manual_cast_dtype") or base.get_dtype()
        x = noisy.to(dev, dtype)
        t = timesteps.to(dev).float()
        extra = {}
        if "y" in cond:
            extra["y"] = cond["y"].to(dev, dtype)
        options = dict(self.model.model_options.get("transformer_options", {}))
        a = self.alphas_cumprod.to(dev)[timesteps.to(dev).long()]
        options["sigmas"] = ((1 - a) / a).sqrt()
        t = base.process_timestep(t, x=x, **extra)
        out = base.diffusion_model(x, t, context=cond["context"].to(dev, dtype), control=None,
                                   transformer_options=options, **extra)
        return out.float()

    # -- training surface ----------------------------------------------------------------------
    def lora_targets(self, unet: bool, text_encoder: bool, conv: bool = False) -> Dict[str, nn.Module]:
        targets: Dict[str, nn.Module] = {}
        if unet and self._family.transformer:  # attention and MLP Linears of the blocks; no convolutions here
            for name, (key, module) in families.flow_lora_targets(self._family, self.model.model.diffusion_model).items():
                targets[name] = module
                self._target_keys[name] = ("unet", key)
            unet = False
        if unet:
            for name, (key, module) in unet_targets(self.model.model, conv).items():
                targets[name] = module
                self._target_keys[name] = ("unet", key)
        if text_encoder:
            if self.clip is None:
                raise ValueError("train_text_encoder is on but no CLIP is connected")
            for name, (key, module) in text_targets(self.clip.cond_stage_model).items():
                targets[name] = module
                self._target_keys[name] = ("clip", key)
        return targets

    def attach_lora(self, network) -> None:
        """Inject the adapters as weight wrappers of the cloned patchers (the trainer's hook)."""
        self._network = network
        for name, adapter in network.adapters.items():
            kind, key = self._target_keys[name]
            self._wrappers.append((kind, key, LoRAWeight(adapter)))
        self._install()
        if self.mode == "lora":
            # The UNet's adapters act on its activations (the frozen path), never through the memory manager,
            # which moves only weight wrappers: made beside weights still offloaded to the CPU (a MODEL not
            # loaded since its loader, or unloaded since), they would stay there while the model computes on
            # its load device.
            for name, adapter in network.adapters.items():
                if self._target_keys[name][0] == "unet":
                    adapter.to(self.device)

    def _patcher(self, kind: str):
        return self.model if kind == "unet" else self.clip.patcher

    def _install(self) -> None:
        """Put the trained deltas into the training run, then load. A LoRA's UNet side runs through
        the frozen path (flow_path._install_frozen: LoRA on the activations, no weight copied); the
        text encoder's, and a full fine-tune's diffs, as weight wrappers of the training clones,
        with fresh-copy wrappers for the other weights that are inference tensors (adapters.FreshCopy)."""
        if self._installed:
            return
        if self._family.transformer:
            self._install_flow()
            self._installed = True
            return
        frozen_unet = self.mode == "lora"
        if frozen_unet:
            self._install_frozen()
        roots = ([] if frozen_unet else [("unet", self.model.model)]) + (
            [("clip", self.clip.cond_stage_model)] if self.train_text_encoder else [])
        for kind, root in roots:
            # The host's loader leaves requires_grad=True on the (frozen) weights: autograd would
            # then compute and keep a .grad for every weight of the shared model at each step.
            for p in root.parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
        wrapped = set()
        for kind, key, wrapper in self._wrappers:
            if kind == "unet" and frozen_unet:
                continue  # FrozenForward adds this LoRA to the module's output
            self._patcher(kind).add_weight_wrapper(key, wrapper)
            wrapped.add((kind, key))
        for kind, root in roots:
            for name, module in comfy_op_modules(root):
                for pname in ("weight", "bias"):
                    t = getattr(module, pname, None)
                    key = f"{name}.{pname}"
                    if isinstance(t, torch.Tensor) and t.is_inference() and (kind, key) not in wrapped:
                        self._patcher(kind).add_weight_wrapper(key, FRESH_COPY)
        if self.train_text_encoder:
            for layer in _text_encoder_layers(self.clip.cond_stage_model):
                if type(layer).__name__ == "CLIPLayer":
                    self._patch_forward(layer, functools.partial(_clip_layer_forward, layer))
        self._installed = True
        self._ensure_loaded()

    def trainable_models(self, unet: bool, text_encoder: bool) -> List[nn.Module]:
        if self._containers is None:
            if self.mode == "full":
                sets = [("unet", _DiffSet(self.model.model))]
                if self.train_text_encoder:
                    sets.append(("clip", _DiffSet(self.clip.cond_stage_model)))
                for kind, diff_set in sets:
                    for key, diff in diff_set.items():
                        self._wrappers.append((kind, key, DiffWeight(diff)))
                self._containers = [s for _, s in sets]
                self._install()
            elif self._network is not None:
                unet_ad = [a for n, a in self._network.adapters.items() if n.startswith("lora_unet")]
                te_ad = [a for n, a in self._network.adapters.items() if not n.startswith("lora_unet")]
                self._containers = [nn.ModuleList(unet_ad)] + ([nn.ModuleList(te_ad)] if te_ad else [])
            else:
                return []
        out = [self._containers[0]] if unet else []
        return out + (list(self._containers[1:]) if text_encoder else [])

    def _patch_forward(self, module: nn.Module, forward) -> None:
        self._forward_patches.append((module, vars(module).get("forward")))
        module.forward = forward

    def _unpatch_forwards(self, count: int) -> None:
        while len(self._forward_patches) > count:
            module, previous = self._forward_patches.pop()
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Checkpoint the UNet's blocks (and the text encoder's layers when it trains), as the
        host's trainer does: the shared modules' forwards are wrapped for the run and restored."""
        if self._family.transformer:  # read by flow_path._flow_block at every block call
            self._flow_checkpointing = bool(enabled)
            return
        if enabled and self._checkpoint_mark is None:
            self._checkpoint_mark = len(self._forward_patches)
            dm = self.model.model.diffusion_model
            # The layers inside each TimestepEmbedSequential: the host's UNet runs a block by
            # iterating its layers (forward_timestep_embed), never through the block's own forward.
            blocks = [layer for seq in list(dm.input_blocks) + [dm.middle_block] + list(dm.output_blocks)
                      for layer in seq]
            if self.train_text_encoder:
                blocks += list(_text_encoder_layers(self.clip.cond_stage_model))
            for block in blocks:
                self._patch_forward(block, functools.partial(_checkpointed, block.forward))
        elif not enabled and self._checkpoint_mark is not None:
            self._unpatch_forwards(self._checkpoint_mark)
            self._checkpoint_mark = None

    def unwrap(self) -> None:
        """After training: the patched forwards of a flow model pass through to the host's."""
        if self._frozen_state is not None:
            self._frozen_state.active = False
            self._training_kernels(False)

    def use_wrapped(self, models: List[nn.Module]) -> None:
        if self._frozen_state is not None:
            self._frozen_state.active = True
            self._training_kernels(True)

    def release(self) -> None:
        """Undo every change made to the shared modules for training (forward patches, swapped tensors)."""
        self.set_gradient_checkpointing(False)
        self._unpatch_forwards(0)
        self._restore_swapped()
        if self._frozen_state is not None:
            self._frozen_state.active = False
            self._training_kernels(False)

    # -- results -------------------------------------------------------------------------------
    def result(self):
        """(MODEL, CLIP) for the graph: fresh clones of the inputs carrying only the trained deltas."""
        if self._result is None:
            model = self.base_model.clone()
            clip = self.base_clip.clone() if self.base_clip is not None else None
            for kind, key, wrapper in self._wrappers:
                (model if kind == "unet" else clip.patcher).add_weight_wrapper(key, wrapper)
            self._result = (model, clip)
        return self._result

    def _sampling_pair(self):
        return self.result() if self._wrappers else (self.base_model, self.base_clip)

    # -- sampling ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], settings, progress=None,
                 latents: Optional[list] = None) -> List[np.ndarray]:
        import comfy.sample
        import comfy.samplers

        if len(prompts) != len(seeds):
            raise ValueError("generate: one seed per prompt")
        if self.vae is None or self.base_clip is None:
            raise ValueError("sampling needs the CLIP and the VAE")
        sampler, _, scheduler = str(settings.sampler).partition(":")
        scheduler = scheduler or "normal"
        if sampler not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"sampler {sampler!r}: not one of ComfyUI's samplers")
        if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r}: not one of ComfyUI's schedulers")
        f = self.latent_factor
        if (settings.width % f or settings.height % f) and not self._family.compression:
            raise ValueError(f"width/height must be multiples of {f}")
        model, clip = self._sampling_pair()
        channels = model.get_model_object("latent_format").latent_channels
        # an empty latent as the stock KSampler passes it on (one frame where the format is 3-D; Stable
        # Cascade's sizes floored, as StableCascade_EmptyLatentImage floors them)
        latent = comfy.sample.fix_empty_latent_channels(
            model, torch.zeros([1, channels, settings.height // f, settings.width // f]))
        hook = self.sampler_step_hook

        def on_step(step, x0, x, total):
            if hook is not None:
                hook()

        images: List[np.ndarray] = []
        state = self._frozen_state
        active = state is not None and state.active
        if state is not None:  # the host samples the result MODEL (its deltas as weight wrappers)
            state.active = False
            self._training_kernels(False)
        try:
            self._sample(model, clip, prompts, seeds, settings, sampler, scheduler, latent, on_step, progress, images,
                         latents)
        finally:
            if state is not None and active:
                state.active = True
                self._training_kernels(True)
        return images

    def _sample(self, model, clip, prompts, seeds, settings, sampler, scheduler, latent, on_step, progress, images,
                latents=None):
        import comfy.sample

        conds: Dict[str, list] = {}

        def cond(text: str):
            if text not in conds:
                conds[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text))
            return conds[text]

        with torch.no_grad():
            for prompt, seed in zip(prompts, seeds):
                noise = comfy.sample.prepare_noise(latent, int(seed))
                samples = comfy.sample.sample(model, noise, settings.steps, settings.guidance, sampler, scheduler,
                                              cond(prompt), cond(settings.negative_prompt), latent, denoise=1.0,
                                              callback=on_step, disable_pbar=True, seed=int(seed))
                if latents is not None:  # the sample as the model made it, in the core's (scaled) latents
                    latents.append(model.get_model_object("latent_format").process_in(samples)[0].float().cpu())
                pixels = self.vae.decode(samples)
                pixels = pixels.reshape(-1, *pixels.shape[-3:])  # frames as images (VAEDecode does the same)
                # 8-bit the way the host's SaveImage writes it, so a class image is the PNG a stock
                # KSampler + VAEDecode + SaveImage graph makes with the same seed.
                arr = np.clip(255.0 * pixels[0].float().cpu().numpy(), 0, 255).astype(np.uint8)
                images.append(arr)
                if progress is not None:
                    progress(len(images), len(prompts))

    # -- full fine-tune ------------------------------------------------------------------------
    def save_full(self, path: str, metadata: Optional[Dict[str, str]] = None) -> List[str]:
        """The fully fine-tuned weights as a checkpoint (UNet, CLIP, VAE) in the host's own format,
        written by comfy.sd.save_checkpoint from clones of the inputs with the deltas as patches."""
        import comfy.sd

        from ..dreambooth_core import fileio

        model = self.base_model.clone()
        clip = self.base_clip.clone() if self.base_clip is not None else None
        unet_patches, clip_patches = {}, {}
        for kind, key, wrapper in self._wrappers:
            if isinstance(wrapper, DiffWeight):
                delta = wrapper.diff.detach().to("cpu", torch.float32)
                (unet_patches if kind == "unet" else clip_patches)[key] = ("diff", (delta,))
        model.add_patches(unet_patches, 1.0)
        if clip is not None and clip_patches:
            clip.add_patches(clip_patches, 1.0)
        out = path if path.endswith(".safetensors") else path + ".safetensors"
        metadata = dict(metadata or {"dreambooth_base_model": self.describe()})
        with fileio.atomic_path(out) as tmp:
            comfy.sd.save_checkpoint(str(tmp), model, clip, self.vae, metadata=metadata)
        return [out]
