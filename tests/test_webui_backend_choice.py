"""Which WebUI backend trains the loaded model is decided by the model's class (scripts/dreambooth_a1111/
loaded.py): Forge's ForgeDiffusionEngine, found through its module, not the `forge_objects` attribute that
reForge's ldm model carries too."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from dreambooth_a1111.loaded import is_forge_engine  # noqa: E402


def _cls(name: str, module: str, *bases):
    return type(name, bases or (object,), {"__module__": module})


def test_forge_engines_are_chosen_by_their_class():
    engine = _cls("ForgeDiffusionEngine", "backend.diffusion_engine.base")
    sdxl = _cls("StableDiffusionXL", "backend.diffusion_engine.sdxl", engine)
    flux = _cls("Flux", "backend.diffusion_engine.flux", engine)
    assert is_forge_engine(sdxl()) and is_forge_engine(flux())


def test_an_ldm_model_with_forge_objects_is_not_a_forge_engine():
    ldm = _cls("LatentDiffusion", "ldm.models.diffusion.ddpm")
    reforge = ldm()
    reforge.forge_objects = object()  # reForge's ldm model carries the attribute too
    assert not is_forge_engine(reforge)
    # a class of that name elsewhere is not Forge's either
    assert not is_forge_engine(_cls("ForgeDiffusionEngine", "some_fork.engine")())
