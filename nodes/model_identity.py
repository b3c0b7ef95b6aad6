"""Which base model a ComfyUI MODEL is, as a trained subject's file records it (family and base
fingerprint, dreambooth_core.adapters.metadata), computed the same way when a subject is trained and
when one is loaded, so that Load Subject can tell a subject trained on another base.

The fingerprint reads the diffusion model's own weights, not what patches made of them: a LoRA (another
Load Subject before this one) that the host merged into the weights in place leaves the original in the
backup of the patcher that loaded the model, and that original is hashed.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ..dreambooth_core.adapters.metadata import weights_fingerprint
from ..dreambooth_core.backends.base import UnsupportedModel
from . import families

PREFIX = "diffusion_model."


def _backups(model) -> dict:
    """Original weights (key -> tensor) that patchers loading this MODEL's module keep while their
    patches are merged in place."""
    import comfy.model_management as mm

    out = {}
    for patcher in [model] + [m.model for m in mm.current_loaded_models if m.model is not None]:
        if getattr(patcher, "model", None) is model.model:
            for key, saved in getattr(patcher, "backup", {}).items():
                out.setdefault(key, saved.weight)
    return out


def model_fingerprint(model) -> str:
    """weights_fingerprint of a MODEL's diffusion model, in its original (unpatched) weights."""
    backups = _backups(model)
    state = {name: backups.get(PREFIX + name, tensor)
             for name, tensor in model.model.diffusion_model.state_dict().items()}
    return weights_fingerprint(state)


def model_family(model) -> Tuple[Optional[str], str]:
    """(the family name the metadata uses, or None for a family DreamBooth does not train; the host's
    class name of the model, for messages)."""
    try:
        family = families.detect(model)
    except UnsupportedModel:
        return None, families.model_class(model)
    if family.transformer:
        return family.name, families.model_class(model)
    import comfy.model_base

    base = model.model
    if isinstance(base, comfy.model_base.SDXL):
        return "sdxl", families.model_class(model)
    return ("sd2" if base.model_config.unet_config.get("context_dim") == 1024 else "sd1"), families.model_class(model)
