"""Test scaffolding for families whose sizes the host hard-codes in `comfy.model_detection.detect_unet_config`
(it reads only "which release" from the tensors): while a test loads its tiny checkpoint, the host's own
detection runs and `adjust` then reads the small sizes off the tensors for that checkpoint alone (a real one
keeps the host's values). Everything after detection is the host's own."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def detect_unet_config_adjusted(adjust: Callable[[dict, dict, str], None]) -> Iterator[None]:
    """`adjust(config, state_dict, key_prefix)` updates the config the host detected, in place, where the
    checkpoint is a reduced test layout."""
    import comfy.model_detection as md

    original = md.detect_unet_config

    def detect(state_dict, key_prefix, metadata=None):
        config = original(state_dict, key_prefix, metadata=metadata)
        if config:
            adjust(config, state_dict, key_prefix)
        return config

    md.detect_unet_config = detect
    try:
        yield
    finally:
        md.detect_unet_config = original
