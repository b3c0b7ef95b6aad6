"""diffusers' Stable Diffusion pipeline classes, imported without a false alarm."""
from __future__ import annotations

from typing import Tuple


def pipeline_classes() -> Tuple[type, type]:
    """(StableDiffusionPipeline, StableDiffusionXLPipeline). Importing them loads transformers' image
    processors, which warn when torchvision is missing (the CLI's environment does not need it); our
    pipelines never take images through them (no safety checker, no feature extractor), so the
    warning would only make a user think something is broken. Transformers' verbosity is restored."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    finally:
        logging.set_verbosity(level)
    return StableDiffusionPipeline, StableDiffusionXLPipeline
