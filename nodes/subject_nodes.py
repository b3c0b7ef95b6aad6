"""Trained subjects as graph assets: DreamBooth Load Subject (a subject from models/loras onto MODEL and
CLIP, plus the phrase that calls it up) and DreamBooth Subject Prompt (the phrase spliced into a prompt).

Classic node style, like the pack's other nodes; nothing heavy is imported at module level. The LoRA
goes through the host's own LoraLoader (`nodes.LoraLoader.load_lora`, i.e. comfy.sd.load_lora_for_models
with the file's tensors and, on hosts that pass it, its metadata), so a subject behaves exactly as the
stock loader's LoRA does, and Load Subject nodes chain like LoraLoaders.
"""
from __future__ import annotations

import logging

from . import subjects

log = logging.getLogger("dreambooth")
CATEGORY = "DreamBooth"
SUBJECT_INPUTS = 4  # Subject Prompt's subject, subject_2 .. subject_4


class DreamBoothLoadSubject:
    """A trained subject on the connected MODEL and CLIP; warns when that MODEL is not the base it
    was trained on (another family or fingerprint), because the subject then rarely shows."""

    def __init__(self):
        self._loader = None  # the host's LoraLoader: it keeps the last file's tensors, as the stock node does

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the subject is applied to."}),
                "clip": ("CLIP", {"tooltip": "The text encoder the subject is applied to."}),
                "subject": (subjects.names(), {"tooltip": "A subject trained by DreamBooth Train (files in "
                                                           "models/loras that DreamBooth made)."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "How strongly the subject changes the diffusion model."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                            "tooltip": "How strongly the subject changes the text encoder."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "subject")
    OUTPUT_TOOLTIPS = ("The model with the subject.", "The text encoder with the subject.",
                       "The phrase that calls the subject up (e.g. 'sks dog'): wire it into DreamBooth Subject "
                       "Prompt. A file trained on several subjects in one run gives every subject's phrase, "
                       "comma-separated ('sks dog, ohwx cat'), as its trigger phrase lists them.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a subject trained by DreamBooth Train, with the phrase that calls it up. Chain several."

    @classmethod
    def IS_CHANGED(cls, subject, **_):
        return subjects.stamp(subject)

    def load(self, model, clip, subject, strength_model, strength_clip):
        import nodes as host_nodes

        from ..dreambooth_core.adapters.metadata import base_mismatch
        from .model_identity import model_family, model_fingerprint

        _, found = subjects.find(subject)
        family, host_class = model_family(model)
        same_family = family is not None and family == found.family
        warning = base_mismatch(found, family or host_class, model_fingerprint(model) if same_family else None)
        if warning:
            log.warning("DreamBooth Load Subject: %s", warning)
        if self._loader is None:
            self._loader = host_nodes.LoraLoader()
        model_out, clip_out = self._loader.load_lora(model, clip, subject, strength_model, strength_clip)
        text = f"warning: {warning}" if warning else f"{found.phrase} ({found.family or 'base unknown'})"
        return {"ui": {"text": [text]}, "result": (model_out, clip_out, found.phrase)}


class DreamBoothSubjectPrompt:
    """A prompt with the subjects' phrases filled in: `{subject}` (or `{subject_1}`), `{subject_2}`, ...;
    a text without placeholders gets the phrases in front, so an existing prompt needs only the wire."""

    @classmethod
    def INPUT_TYPES(cls):
        optional = {f"subject_{i}": ("STRING", {"forceInput": True, "tooltip": f"Fills {{subject_{i}}}."})
                    for i in range(2, SUBJECT_INPUTS + 1)}
        return {
            "required": {
                "text": ("STRING", {"default": "a photo of {subject} on a beach", "multiline": True,
                                    "tooltip": "The prompt; {subject} stands for the subject's phrase."}),
                "subject": ("STRING", {"forceInput": True, "tooltip": "A Load Subject's subject output."}),
            },
            "optional": optional,
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("The prompt with the phrases filled in: wire it into a CLIP Text Encode's text.",)
    FUNCTION = "fill"
    CATEGORY = CATEGORY
    DESCRIPTION = "Fills {subject}-style placeholders of a prompt with Load Subject phrases."

    def fill(self, text, subject, **more):
        from ..dreambooth_core.sampling.prompts import fill_subjects

        phrases = [subject] + [more.get(f"subject_{i}") or "" for i in range(2, SUBJECT_INPUTS + 1)]
        try:
            return (fill_subjects(text, phrases),)
        except ValueError as exc:
            raise ValueError(f"DreamBooth Subject Prompt: {exc}") from None


NODE_CLASS_MAPPINGS = {
    "DreamBoothLoadSubject": DreamBoothLoadSubject,
    "DreamBoothSubjectPrompt": DreamBoothSubjectPrompt,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamBoothLoadSubject": "DreamBooth Load Subject",
    "DreamBoothSubjectPrompt": "DreamBooth Subject Prompt",
}

subjects.register_routes()  # GET /dreambooth/subjects: the page shows the chosen subject's preview
