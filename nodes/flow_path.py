"""The transformers' side of the "comfy" backend: the flow-matching ones (Flux dev/schnell, Flux 2,
SD3/SD3.5, Chroma, Lumina 2, Z-Image, Qwen-Image, AuraFlow, HunyuanImage 2.1, HiDream, Omnigen2, Cosmos
Predict2) and the discrete-schedule ones (PixArt α/Σ, Hunyuan-DiT); families.py says which. Their text, their
prediction (velocity, or ε / v) through the host's own `extra_conds` and `_apply_model` pieces, and how their
frozen weights take part in training without being copied. A mixin of `comfy_backend.ComfyBackend`, which
holds the state it uses."""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import torch
import torch.utils.checkpoint
from torch import nn

from ..dreambooth_core.backends.base import UnsupportedModel
from . import families
from .adapters import FrozenState, direct_op, frozen_forward, frozen_patchable

log = logging.getLogger("dreambooth")


_EXTRA = "extra:"  # the cond entries that go to the host's `extra_conds` as they are (_encode_flow)


class _Streams:
    """The storages of the tensors a flow block is running on (its copied inputs), while it runs."""

    def __init__(self) -> None:
        self.storages: Set[int] = set()


def _storage(t: Any) -> Optional[int]:
    return t.untyped_storage().data_ptr() if torch.is_tensor(t) and t.layout == torch.strided else None


def _reads_a_copy(streams: _Streams, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A module inside a flow block, given a copy of any argument that is the block's residual stream:
    the block adds to that stream in place after this module has read it, and whatever this module
    saved for backward (a norm's input) must keep the values it read."""
    if streams.storages:
        def copy(v):
            return v.clone() if _storage(v) in streams.storages else v

        args = tuple(copy(a) for a in args)
        kwargs = {k: copy(v) for k, v in kwargs.items()}
    return forward(*args, **kwargs)


def _block_on_copies(streams: _Streams, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A flow block run on copies of its tensor arguments (the caller's tensors stay as they were),
    whose storages its submodules copy again when they read them (_reads_a_copy)."""
    def fresh(v):
        return v.clone() if torch.is_tensor(v) else v

    args = tuple(fresh(a) for a in args)
    kwargs = {k: fresh(v) for k, v in kwargs.items()}
    before = streams.storages
    streams.storages = {p for p in map(_storage, list(args) + list(kwargs.values())) if p is not None}
    try:
        return forward(*args, **kwargs)
    finally:
        streams.storages = before


class FlowModelPath:
    _flow_checkpointing: bool = False  # set_gradient_checkpointing's choice, read at every block call
    _kitchen_fused: Optional[Callable[..., Any]] = None  # comfy_kitchen's op while a run replaces it

    def _cap_tokens(self, key: str, windows: list) -> list:
        """The first window of each tokenizer (CLIP's 77; a T5 / Gemma tokenizer makes one window of
        the whole prompt), a long-context one cut at the family's text_cap tokens (its end token kept)."""
        first = windows[:1]
        cap = dict(self._family.windows).get(key, self._family.text_cap)
        if key in ("l", "g", "h") or not first or len(first[0]) <= cap:
            return first
        log.warning("DreamBooth: a caption has %d %s tokens; %s trains on the first %d", len(first[0]), key,
                    self._family.name, cap)
        return [first[0][:cap - 1] + first[0][-1:]]

    def _encode_flow(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Each prompt as the host encodes it (`encode_from_tokens`, its own padding: Flux's T5 to 256
        tokens, none for Chroma / Lumina 2), zero-padded to one length per family so the core can batch
        cached captions; `context_len` says how much is real. predict() cuts the padding off again."""
        width = self._family.text_cap + 77
        rows = []
        for prompt in prompts:
            tokens = {k: self._cap_tokens(k, v) for k, v in self.clip.tokenize(prompt).items()}
            rows.append(self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True))
        n = len(rows)
        first = rows[0]["cond"]
        out = {"context": first.new_zeros((n, width, first.shape[-1])),
               "context_len": torch.tensor([r["cond"].shape[1] for r in rows], dtype=torch.long)}
        for i, r in enumerate(rows):
            out["context"][i, :r["cond"].shape[1]] = r["cond"][0]
        if rows[0].get("pooled_output") is not None:
            out["pooled"] = torch.cat([r["pooled_output"] for r in rows])
        if rows[0].get("attention_mask") is not None:
            out["attention_mask"] = torch.zeros((n, width), dtype=rows[0]["attention_mask"].dtype)
            for i, r in enumerate(rows):
                out["attention_mask"][i, :r["attention_mask"].shape[-1]] = r["attention_mask"][0]
        for key in self._family.extras:  # to `extra_conds` under their names, as the host's conditioning carries them
            values = [r.get(key) for r in rows]
            if any(v is None for v in values) or len({tuple(v.shape) for v in values}) != 1:
                raise UnsupportedModel(f"this {self._family.name} CLIP returns `{key}` of another shape per prompt "
                                       "or not at all (a node changed its padding?); connect the CLIP as its loader "
                                       "gives it")
            out[_EXTRA + key] = torch.cat(values)
        extras = self._family.text_extras
        if extras:  # zero-padded as the context, `extra_len` of them real
            out["extra_len"] = torch.tensor([r[extras[0]].shape[1] for r in rows], dtype=torch.long)
            for key in extras:
                t = rows[0][key]
                out[key] = t.new_zeros((n, width) + tuple(t.shape[2:]))
                for i, r in enumerate(rows):
                    out[key][i, :r[key].shape[1]] = r[key][0]
        return out

    def _flow_conds(self, x: torch.Tensor, cond: Dict[str, torch.Tensor], i: int) -> dict:
        """Sample i's model inputs from the host's own `extra_conds` (as a sampler makes them)."""
        n = int(cond["context_len"][i])
        kw = {"noise": x[i:i + 1], "device": x.device, "width": x.shape[-1] * self.latent_factor,
              "height": x.shape[-2] * self.latent_factor, "prompt_type": "positive",
              "cross_attn": cond["context"][i:i + 1, :n].to(x.device)}
        # None where the encoder pools nothing (Chroma, Lumina 2), as the host's conditioning carries it
        kw["pooled_output"] = cond["pooled"][i:i + 1].to(x.device) if "pooled" in cond else None
        if "attention_mask" in cond:
            kw["attention_mask"] = cond["attention_mask"][i:i + 1, :n].to(x.device)
        kw.update({k[len(_EXTRA):]: v[i:i + 1].to(x.device) for k, v in cond.items() if k.startswith(_EXTRA)})
        for key in self._family.text_extras:
            kw[key] = cond[key][i:i + 1, :int(cond["extra_len"][i])].to(x.device)
        conds = self.model.model.extra_conds(**kw)
        return {k: c.process_cond(batch_size=1, device=x.device, area=None) for k, c in conds.items()}

    def _transformer_options(self, sigma: torch.Tensor) -> dict:
        """The MODEL's transformer_options with its patcher's wrappers and callbacks merged in, as the
        host's samplers pass them (`sampler_helpers.prepare_model_patcher`), plus this call's σ."""
        import comfy.patcher_extension as pe

        options = pe.copy_nested_dicts(self.model.model_options.get("transformer_options", {}))
        for name in ("wrappers", "callbacks"):
            pe.merge_nested_dicts(options.setdefault(name, {}), getattr(self.model, name, {}), copy_dict1=False)
        options["sigmas"] = sigma
        options["cond_or_uncond"] = [0]
        return options

    def _wraps_apply_model(self, options: dict) -> bool:
        import comfy.patcher_extension as pe

        return bool(self.model.model_options.get("model_function_wrapper")
                    or pe.get_all_wrappers(pe.WrappersMP.APPLY_MODEL, options))

    def _host_noise_level(self, x: torch.Tensor, sigma: torch.Tensor):
        """The core's point x = (1−σ)·x0 + σ·ε at σ as the host's sampler holds it: unchanged for CONST; for
        COSMOS_RFLOW its σ_e = σ/(1−σ) and the unscaled x0 + σ_e·ε = x/(1−σ) (families.cosmos_max_sigma)."""
        if self._family.sampling != "COSMOS_RFLOW":
            return x, sigma
        return x / (1 - sigma).view(-1, *([1] * (x.ndim - 1))), sigma / (1 - sigma)

    def _flow_forward(self, x: torch.Tensor, sigma: torch.Tensor, conds: dict) -> torch.Tensor:
        """The raw output for one batch whose conds concatenate: `BaseModel._apply_model` up to the
        diffusion model's output, which is the target of the sampling's kind (CONST and COSMOS_RFLOW: v,
        denoised = x − σ·v on the core's line; EPS: ε; V_PREDICTION: v)."""
        import comfy.model_base
        import comfy.model_management as mm

        base = self.model.model
        host_x, host_sigma = self._host_noise_level(x, sigma)
        options = self._transformer_options(host_sigma)
        if self._wraps_apply_model(options):
            wrapper = self.model.model_options.get("model_function_wrapper")
            if wrapper is not None:
                c = dict(conds, transformer_options=options)
                denoised = wrapper(base.apply_model, {"input": host_x, "timestep": host_sigma, "c": c,
                                                      "cond_or_uncond": [0]})
            else:
                denoised = base.apply_model(host_x, host_sigma, transformer_options=options, **conds)
            return self._raw_output(x, sigma, denoised.float())
        conds = dict(conds)
        context = conds.pop("c_crossattn", None)
        if conds.pop("c_concat", None) is not None:
            raise UnsupportedModel(f"{families.model_class(self.base_model)} asked for concatenated image inputs")
        sampling = base.model_sampling
        get_dtype = getattr(base, "get_dtype_inference", None)
        dtype = get_dtype() if get_dtype is not None else (base.manual_cast_dtype or base.get_dtype())
        xc = sampling.calculate_input(host_sigma, host_x).to(dtype)
        t = sampling.timestep(host_sigma).float()
        if context is not None:
            context = mm.cast_to_device(context, x.device, dtype)
        extra = {k: ([comfy.model_base.convert_tensor(e, dtype, x.device) for e in v] if isinstance(v, list)
                     else comfy.model_base.convert_tensor(v, dtype, x.device)) for k, v in conds.items()}
        t = base.process_timestep(t, x=x, **extra)
        if hasattr(self.model, "is_dynamic"):
            options["prefetch_dynamic_vbars"] = base.current_patcher is not None and base.current_patcher.is_dynamic()
        out = base.diffusion_model(xc, t, context=context, control=None, transformer_options=options, **extra)
        return out.float()

    def _raw_output(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """The diffusion model's raw output from what `apply_model` returned (`calculate_denoised` undone):
        x − σ·out for CONST and EPS; for V_PREDICTION (σ_d: sigma_data) x·σ_d²/(σ²+σ_d²) − out·σ·σ_d/√(σ²+σ_d²)."""
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        if self.prediction_type != "v_prediction":
            return (x - denoised) / s
        d = float(self.model_sampling.sigma_data)
        return (x * d ** 2 / (s ** 2 + d ** 2) - denoised) * (s ** 2 + d ** 2).sqrt() / (s * d)

    def _predict_transformer(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                             cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The schedule's target: the velocity at σ (flow), or ε / v at integer t (discrete). A discrete
        schedule's input √ᾱ·x0 + √(1−ᾱ)·ε is the host's x0 + σε (σ = √((1−ᾱ)/ᾱ), the schedule's σ at t:
        comfy_backend._training_sigmas) divided by √(1+σ²), which its `calculate_input` divides by again."""
        if self._family.flow:
            return self._predict_flow(noisy, timesteps, cond)
        sigmas = self.schedule_sigmas[timesteps.long().cpu()].to(noisy.device)
        scale = (1 + sigmas ** 2).sqrt().view(-1, *([1] * (noisy.ndim - 1)))
        return self._predict_flow(noisy.float() * scale, sigmas, cond)

    def _predict_flow(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The raw output at σ (the host's input scale). Samples whose conds the host would batch together
        (same text length, same constants) share a forward; others get their own, so no sample sees padding
        it would not see at inference."""
        dev = self.device
        x = self._host_latents(noisy.to(dev, torch.float32))
        sigma = sigmas.to(dev, torch.float32).reshape(-1)
        per = [self._flow_conds(x, cond, i) for i in range(x.shape[0])]
        groups: List[List[int]] = []
        for i, c in enumerate(per):
            for g in groups:
                first = per[g[0]]
                if first.keys() == c.keys() and all(first[k].can_concat(c[k]) for k in c):
                    g.append(i)
                    break
            else:
                groups.append([i])
        pieces, order = [], []
        for g in groups:
            conds = {k: per[g[0]][k].concat([per[j][k] for j in g[1:]]) for k in per[g[0]]}
            idx = torch.tensor(g, device=dev)
            pieces.append(self._flow_forward(x[idx], sigma[idx], conds))
            order += g
        out = torch.cat(pieces)
        if order != sorted(order):
            out = out[torch.tensor(order, device=dev).argsort()]
        return out.reshape(noisy.shape)

    def _host_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The core's [B, C, H, W] latents in the host's layout: one frame ([B, C, 1, H, W]) where the
        family's latent format is 3-D (Qwen-Image's Wan 2.1 latents), as an empty latent reaches the model
        through the host's `fix_empty_latent_channels`."""
        dims = getattr(self.model.get_model_object("latent_format"), "latent_dimensions", 2)
        return x.unsqueeze(2) if dims == 3 and x.ndim == 4 else x

    def _install_flow(self) -> None:
        """The frozen path (below), every transformer block through _flow_block. The host's blocks add
        to their residual stream in place (Flux, Chroma: `img += ...`, `x.addcmul_(...)`) after their
        norms saved it for backward: plain autograd refuses that, and a recomputed block
        (torch.utils.checkpoint keeps aliases of what the recomputation saved) would silently use the
        updated values. So each block runs on copies of its inputs and every module inside it reads
        a copy of the stream: the gradients are exact, with checkpointing on or off."""
        self._install_frozen()
        dm = self.model.model.diffusion_model
        streams = _Streams()
        for block in families.flow_blocks(self._family, dm):
            for module in block.modules():
                if module is not block:
                    self._patch_forward(module, functools.partial(_reads_a_copy, streams, module.forward))
            self._patch_forward(block, functools.partial(self._flow_block, streams, block.forward))

    def _flow_block(self, streams: _Streams, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One transformer block: the host's forward when no gradient is taken; else on copies
        (_block_on_copies), recomputed in the backward pass when gradient checkpointing is on."""
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        run = functools.partial(_block_on_copies, streams, forward)
        if self._flow_checkpointing:
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
        return run(*args, **kwargs)

    def _install_frozen(self) -> None:
        """Patch the shared diffusion model's forwards for the run (restored by release()): every
        plain Linear and Conv2d through FrozenForward (with its LoRA where the network has one), every
        plain GroupNorm and LayerNorm as torch's own op (DirectOp: no cast per call), and
        the remaining frozen inference tensors (norm scales, pad tokens, embeddings: small) swapped
        for ordinary copies, which autograd may save. No weight is copied per forward, none is
        kept for backward, and no W + ΔW is made."""
        dm = self.model.model.diffusion_model
        for p in self.model.model.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
        self._frozen_state = state = FrozenState()
        self._training_kernels(True)
        adapters = {}
        if self._network is not None:
            keys = {key: name for name, (kind, key) in self._target_keys.items() if kind == "unet"}
            for path, module in dm.named_modules():
                name = keys.get(f"diffusion_model.{path}.weight")
                if name is not None and name in self._network.adapters:
                    adapters[id(module)] = self._network.adapters[name]
        patched = set()
        for path, module in dm.named_modules():
            if frozen_patchable(module):
                self._patch_forward(module, frozen_forward(module, state, adapters.pop(id(module), None)))
                patched.add(id(module))
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                norm = direct_op(module)  # no cast per call; its weights become the ordinary copies below
                if norm is not None:
                    self._patch_forward(module, norm)
        if adapters:
            raise RuntimeError(f"{len(adapters)} LoRA targets are not plain Linears or convolutions of the host; "
                               "cannot train them")
        self._ensure_loaded()  # the copies below are made where the memory manager put the weights
        with torch.inference_mode(False):
            for module in dm.modules():
                if id(module) in patched:
                    continue
                for name, t in list(module._parameters.items()):
                    if t is not None and t.is_inference():
                        copy = nn.Parameter(t.clone(), requires_grad=False)
                        self._swapped.append((module, name, t))
                        module._parameters[name] = copy
                        self.frozen_copied_bytes += t.nelement() * t.element_size()

    def _training_kernels(self, on: bool) -> None:
        """The host's switch (0.3.65 on: `comfy.model_management.in_training`, what its own trainer sets)
        from fused inference kernels without a backward (comfy_kitchen's RoPE) to differentiable ones."""
        import comfy.model_management as mm

        self._kitchen_with_backward(on)
        if hasattr(mm, "in_training"):
            if on and self._kernels_before is None:
                self._kernels_before = getattr(mm, "in_training")
                setattr(mm, "in_training", True)
            elif not on and self._kernels_before is not None:
                setattr(mm, "in_training", self._kernels_before)
                self._kernels_before = None

    def _kitchen_with_backward(self, on: bool) -> None:
        """comfy_kitchen's fused RMSNorm + split-half RoPE (`rms_rope_split_half`), which 0.33's Cosmos Predict2
        attention calls whatever `in_training` says, has no autograd formula: while a run trains, the calls
        that take a gradient go to comfy_kitchen's own eager (plain torch) implementation of it instead."""
        try:
            import comfy_kitchen as ck
            from comfy_kitchen.backends.eager import rope
        except ImportError:
            return
        if on and self._kitchen_fused is None and hasattr(ck, "rms_rope_split_half") \
                and hasattr(rope, "rms_rope_split_half"):
            fused = self._kitchen_fused = ck.rms_rope_split_half

            def rms_rope_split_half(*args: Any, **kwargs: Any) -> Any:
                grad = torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad
                                                       for a in list(args) + list(kwargs.values()))
                return (rope.rms_rope_split_half if grad else fused)(*args, **kwargs)

            ck.rms_rope_split_half = rms_rope_split_half
        elif not on and self._kitchen_fused is not None:
            ck.rms_rope_split_half = self._kitchen_fused
            self._kitchen_fused = None

    def _restore_swapped(self) -> None:
        """Put the host's own tensors back; where the memory manager has moved the module since, the
        copy (same values, on the module's device now) stays."""
        while self._swapped:
            module, name, original = self._swapped.pop()
            current = module._parameters.get(name)
            if current is None or current.device == original.device:
                module._parameters[name] = original
