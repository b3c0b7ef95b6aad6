"""Which WebUI backend trains the loaded model: chosen by what `shared.sd_model` is.

Automatic1111 holds an ldm `LatentDiffusion`; Forge-family WebUIs (lllyasviel's Forge, Forge Neo) hold a
`ForgeDiffusionEngine` (`backend/diffusion_engine/base.py`), whose parts live under `forge_objects`. The
class decides, through its module: an attribute would not (reForge's ldm model carries `forge_objects`
too). Forge loads the selected checkpoint only at the first generation (until then `shared.sd_model` is
a `FakeInitialModel`) and after a checkpoint change: `loaded_model()` asks it to load first.
"""
from __future__ import annotations

FORGE_ENGINE = ("backend.diffusion_engine.base", "ForgeDiffusionEngine")


def is_forge_engine(model) -> bool:
    """True for an instance of Forge's ForgeDiffusionEngine (any engine: SD1, SDXL, Flux, ...)."""
    return any((c.__module__, c.__name__) == FORGE_ENGINE for c in type(model).__mro__)


def loaded_model():
    """The WebUI's current model (loaded now if Forge has only selected it), or a ValueError a user can act on."""
    from modules import sd_models, shared

    reload = getattr(sd_models, "forge_model_reload", None)
    data = getattr(sd_models, "model_data", None)
    # Forge: load when the selected checkpoint is not the loaded one (holding the queue lock, as a
    # generation would; not otherwise, so the token check answers while a job trains).
    if reload is not None and str(getattr(data, "forge_loading_parameters", "?")) != getattr(data, "forge_hash", None):
        from modules.call_queue import queue_lock

        try:
            with queue_lock:
                reload()
        except (KeyError, ValueError) as exc:  # nothing selected (no checkpoint in its folder)
            raise ValueError(f"no checkpoint is loaded in the WebUI ({exc}): pick one in the 'Stable Diffusion "
                             "checkpoint' menu") from None
    model = shared.sd_model
    if model is None or type(model).__name__ == "FakeInitialModel":
        raise ValueError("no checkpoint is loaded in the WebUI: pick one in the 'Stable Diffusion checkpoint' menu")
    return model


def make_backend(mode: str = "lora", train_text_encoder: bool = False):
    """The backend for the loaded model: ForgeBackend on a Forge engine, A1111Backend otherwise.
    UnsupportedModel (a ValueError) names a model that cannot train, before any work."""
    model = loaded_model()
    if is_forge_engine(model):
        from .forge_backend import ForgeBackend

        return ForgeBackend(model, mode=mode, train_text_encoder=train_text_encoder)
    from .backend import A1111Backend

    return A1111Backend(model, mode=mode, train_text_encoder=train_text_encoder)
