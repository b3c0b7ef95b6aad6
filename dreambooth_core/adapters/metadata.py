"""What a trained subject's file says about itself, in the keys the ecosystem already reads.

One builder for every file the pack writes (a LoRA, a full fine-tune's checkpoint), whatever the host,
and one reader for the hosts that list trained subjects (ComfyUI's Load Subject node):
  - kohya's `ss_*` keys: the WebUI's LoRA cards read `ss_tag_frequency` for the trigger words
    (extensions-builtin/Lora/ui_edit_user_metadata.build_tags), `ss_base_model_version` / `ss_v2` to
    file a LoRA under SD1 / SD2 / SDXL (network.NetworkOnDisk.detect_version), `ss_output_name` as its
    alias, and `ssmd_cover_images` (base64 images) as the card's picture;
  - Stability's model spec (`modelspec.*`): title, trigger phrase, architecture, resolution and a
    thumbnail (a small JPEG data URI), which ComfyUI-side tools read;
  - ours (`dreambooth_*`): what a later user of the subject needs, machine-readable.

The base fingerprint (`dreambooth_base_fingerprint`) identifies the weights the subject was trained on
so that a loader can tell whether the model it applies the subject to is that one: a hash of eight
weight tensors of the denoiser (UNet or transformer), picked at evenly spaced places of the sorted
names of its weights with two or more dimensions, each as its name, shape and first 4096 values
rounded to fp16. It reads a few KB, so a loader recomputes it from a loaded model at once; fp32 and
fp16 loads of one file agree (rounding to fp16 is exact for both), a bf16 or fp8 load does not. The
names are the host's layout: ComfyUI and the WebUI hold the same (ldm) names, the standalone diffusers
backend diffusers' own.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .. import __version__
from ..fileio import safe_name

#: the key whose presence says a file was written by this pack
OURS_KEY = "dreambooth_version"
#: longest side of the embedded preview, in pixels (a JPEG of a few KB)
THUMBNAIL_SIZE = 128

#: per base family: kohya's `ss_base_model_version` and the Stability model-spec architecture. The WebUI's
#: LoRA cards tell SD1 / SD2 / SDXL apart by `ss_base_model_version` ("sdxl_" prefix) and `ss_v2`, and hide
#: a LoRA under checkpoints of another family; ComfyUI shows model-spec fields.
FAMILIES = {
    "sd1": ("sd_v1", "stable-diffusion-v1"),
    "sd2": ("sd_v2", "stable-diffusion-v2-512"),
    "sd2-v": ("sd_v2", "stable-diffusion-v2-768-v"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    # Flow-matching transformers, in sd-scripts' names (library/sai_model_spec.py, flux_utils, lumina_util).
    # For SD3 sd-scripts writes its model type ("medium", "5-large") as ss_base_model_version, which names no
    # family; "sd3" does, and the architecture is sd-scripts' "stable-diffusion-3-" + type.
    "flux": ("flux1", "flux-1-dev"),
    "flux-schnell": ("flux1", "flux-1-schnell"),
    "sd3": ("sd3", "stable-diffusion-3-medium"),
    "chroma": ("chroma", "chroma"),
    "chroma-radiance": ("chroma_radiance", "chroma-radiance"),  # no trainer we follow names it: ComfyUI's image_model
    "lumina2": ("lumina2", "lumina-2"),
    "qwen-image": ("qwen_image", "Qwen-Image"),  # musubi-tuner's architecture name (sd-scripts has none)
    "auraflow": ("auraflow", "auraflow"),  # no trainer we follow names it; ComfyUI's class, lower case
    "hunyuan-image": ("hunyuan_image_2.1", "hunyuan-image-2.1"),  # sd-scripts' sai_model_spec architecture
    "flux2": ("flux_2_dev", "Flux.2-dev"),  # musubi-tuner's names (FLUX.2-dev; Klein loads as the same class)
    "cosmos-predict2": ("cosmos_predict2", "cosmos-predict2"),  # no trainer we follow names it: ComfyUI's image_model
    # no trainer we follow names these: ComfyUI's names, lower case
    "z-image": ("z_image", "z-image"),
    "hidream": ("hidream", "hidream"),
    "omnigen2": ("omnigen2", "omnigen2"),
    # No trainer we follow names these: ComfyUI's names (PixArt's `image_model`, Hunyuan-DiT's CLIP type
    # `hunyuan_dit`), the architecture in model-spec's dashed form.
    "pixart-alpha": ("pixart_alpha", "pixart-alpha"),
    "pixart-sigma": ("pixart_sigma", "pixart-sigma"),
    "hunyuan-dit": ("hunyuan_dit", "hunyuan-dit"),
    # Stable Cascade's stage C: model-spec's "stable-cascade-v1-prior" (as SD.Next writes it); the version in
    # the same snake case as the others
    "stable-cascade-c": ("stable_cascade", "stable-cascade-v1-prior"),
}


def family_metadata(family: str, prediction_type: str, kind: str = "lora") -> Dict[str, str]:
    """What the file says about its base model's family, in the keys the WebUI and model-spec readers use;
    `kind` "lora" or "checkpoint" (the model-spec architecture of a LoRA ends in "/lora")."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: the LoRA metadata knows {sorted(FAMILIES)}")
    if family == "sd2" and prediction_type == "v_prediction":
        family = "sd2-v"
    version, architecture = FAMILIES[family]
    return {"ss_base_model_version": version, "ss_v2": str(version == "sd_v2"),
            "ss_v_parameterization": str(prediction_type == "v_prediction"),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": architecture + ("/lora" if kind == "lora" else "")}


def weights_fingerprint(state: Mapping[str, Any], picks: int = 8, values: int = 4096) -> str:
    """The base fingerprint of a denoiser's weights (name -> tensor; see the module docstring)."""
    import torch

    names = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.ndim >= 2)
    if not names:
        raise ValueError("weights_fingerprint: the model has no weight with two or more dimensions")
    chosen = sorted({names[int(i * (len(names) - 1) / max(1, picks - 1))] for i in range(picks)})
    h = hashlib.sha256(b"dreambooth-base-1")
    for name in chosen:
        t = state[name].detach().reshape(-1)[:values]
        h.update(f"{name}:{list(state[name].shape)}".encode())
        h.update(t.to(device="cpu", dtype=torch.float16).numpy().tobytes())
    return h.hexdigest()[:16]


def thumbnail_uri(image: Any, size: int = THUMBNAIL_SIZE) -> str:
    """A small JPEG of `image` (PIL image or H×W×3 uint8 array) as a data URI (modelspec.thumbnail)."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    im = im.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def subject_phrase(token: str, class_noun: str) -> str:
    """What a prompt writes to call the subject up: "sks dog"."""
    return f"{token} {class_noun}".strip()


def subject_metadata(config, backend, steps: int, *, kind: str = "lora", images: int = 0,
                     base_fingerprint: Optional[str] = None, thumbnail: Optional[str] = None,
                     thumbnail_source: str = "") -> Dict[str, str]:
    """Everything a file of this run says: kohya's `ss_*`, the model spec and ours. `images`: the
    instance photos trained on; `base_fingerprint`: weights_fingerprint of the base, taken before
    training changed anything (default: the backend's `base_fingerprint()` where it has one);
    `thumbnail`: a data URI (thumbnail_uri), `thumbnail_source` saying what it shows."""
    subjects = run_subjects(config, images)
    phrase = ", ".join(sub["phrase"] for sub in subjects)  # model-spec and LoRA managers: comma-separated
    prompt = config.resolved_instance_prompt()
    prompts = "; ".join(sub["instance_prompt"] for sub in subjects)
    resolution = int(config.resolution or backend.native_resolution)
    if base_fingerprint is None:
        base_fingerprint = backend.base_fingerprint() if hasattr(backend, "base_fingerprint") else ""
    title = safe_name(config.save_name)
    meta = {
        "ss_output_name": title,
        "ss_training_comment": f"DreamBooth: {prompts}",
        "ss_steps": str(steps),
        "ss_max_train_steps": str(config.steps),
        "ss_learning_rate": f"{config.resolved_lr():g}",
        "ss_caption_dropout_rate": f"{config.caption_dropout:g}",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(images),
        # kohya's folder name "<repeats>_<identifier> <class>" and its captions' tags, one per subject: the
        # WebUI's card offers the phrases as the trigger words
        "ss_tag_frequency": json.dumps({f"{sub['repeats']}_{sub['phrase']}": {sub["phrase"]: max(1, sub["images"])}
                                        for sub in subjects}),
        "ss_sd_model_name": backend.describe(),
        **family_metadata(backend.family, backend.prediction_type, kind),
        "modelspec.title": title,
        "modelspec.trigger_phrase": phrase,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.description": (f"DreamBooth subject '{phrase}' ({prompt})" if len(subjects) == 1 else
                                  "DreamBooth subjects " + ", ".join(f"'{sub['phrase']}'" for sub in subjects)
                                  + f" ({prompts})"),
        "dreambooth_kind": kind,
        "dreambooth_token": config.token,
        "dreambooth_class_noun": config.class_noun,
        "dreambooth_instance_prompt": prompt,
        "dreambooth_base_family": backend.family,
        "dreambooth_base_model": backend.describe(),
        "dreambooth_base_fingerprint": base_fingerprint,
        "dreambooth_resolution": str(resolution),
        "dreambooth_steps": str(steps),
        "dreambooth_prior_preservation": str(config.prior).lower(),
        OURS_KEY: __version__,
    }
    if config.concepts:  # several subjects: each one's identifier, class noun, photos, repeats and loss weight
        meta["dreambooth_subjects"] = json.dumps(subjects)
    if kind == "lora":
        meta.update({"dreambooth_rank": str(config.rank), "dreambooth_lora_targets": config.lora_targets})
    if thumbnail:
        meta["modelspec.thumbnail"] = thumbnail
        meta["ssmd_cover_images"] = json.dumps([thumbnail.split(",", 1)[1]])  # the WebUI's card picture
        meta["dreambooth_thumbnail_source"] = thumbnail_source
    return meta


def run_subjects(config, images: int) -> List[dict]:
    """The subjects a run trained: config.concepts (several subjects; each one's `images` filled in when
    its photos were prepared), or the one of config.token and class_noun with all `images`."""
    entries = config.concepts or [{"token": config.token, "class_noun": config.class_noun, "images": images}]
    template = config.instance_prompt or "a photo of {token} {class}"
    def prompt(e: Mapping) -> str:
        return template.replace("{token}", e["token"]).replace("{class}", e.get("class_noun") or "").strip()

    return [{"token": e["token"], "class_noun": e.get("class_noun") or "",
             "phrase": subject_phrase(e["token"], e.get("class_noun") or ""), "instance_prompt": prompt(e),
             "images": int(e.get("images") or 0), "repeats": int(e.get("repeats", 1)),
             "loss_weight": float(e.get("loss_weight", 1.0))} for e in entries]


def lora_metadata(config, backend, steps: int, **extra) -> Dict[str, str]:
    """subject_metadata of a LoRA, with kohya's LoCon arguments where the convolutions carry adapters."""
    meta = subject_metadata(config, backend, steps, kind="lora", **extra)
    if config.lora_conv:  # kohya's LoCon: the res-block convolutions carry adapters of the same rank
        rank, alpha = config.rank, config.alpha if config.alpha is not None else config.rank
        meta["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": f"{alpha:g}"})
    return meta


def checkpoint_metadata(config, backend, steps: int, **extra) -> Dict[str, str]:
    """subject_metadata of a full fine-tune's checkpoint."""
    return subject_metadata(config, backend, steps, kind="checkpoint", **extra)


@dataclass(frozen=True)
class Subject:
    """A trained subject as its file describes it (read_subject)."""

    title: str
    phrase: str
    token: str
    class_noun: str
    instance_prompt: str
    family: str
    fingerprint: str
    base_model: str
    thumbnail: str  # data URI, or "" where the file has none
    kind: str
    phrases: Tuple[str, ...] = ()  # each subject's phrase: one, or several where one run trained several


def _phrases(m: Mapping[str, str], phrase: str) -> Tuple[str, ...]:
    """Each subject's phrase: from dreambooth_subjects (a file of several subjects), else the one phrase."""
    try:
        subjects = json.loads(m.get("dreambooth_subjects") or "[]")
        found = tuple(str(sub["phrase"]) for sub in subjects if sub.get("phrase"))
    except (ValueError, TypeError, KeyError, AttributeError):
        found = ()
    return found or (phrase,)


def read_subject(metadata: Mapping[str, str]) -> Optional[Subject]:
    """The subject a file's metadata describes, or None when this pack did not write it."""
    m = metadata or {}
    if OURS_KEY not in m:
        return None
    token, noun = m.get("dreambooth_token", ""), m.get("dreambooth_class_noun", "")
    phrase = m.get("modelspec.trigger_phrase") or subject_phrase(token, noun)
    return Subject(title=m.get("modelspec.title") or m.get("ss_output_name", ""), phrase=phrase,
                   phrases=_phrases(m, phrase),
                   token=token, class_noun=noun, instance_prompt=m.get("dreambooth_instance_prompt", ""),
                   family=m.get("dreambooth_base_family", ""), fingerprint=m.get("dreambooth_base_fingerprint", ""),
                   base_model=m.get("dreambooth_base_model", ""), thumbnail=m.get("modelspec.thumbnail", ""),
                   kind=m.get("dreambooth_kind", "lora"))


def base_mismatch(subject: Subject, family: Optional[str], fingerprint: Optional[str]) -> Optional[str]:
    """A warning when a model of `family` / `fingerprint` is not the base the subject was trained on
    (None when it is, or when the file predates what would tell)."""
    if subject.family and family and subject.family != family:
        return (f"'{subject.title}' was trained on a {subject.family} model ({subject.base_model}); the connected "
                f"MODEL is {family}: the subject will likely not appear. Connect the {subject.family} model it "
                "was trained on, or pick a subject trained on this model")
    if subject.fingerprint and fingerprint and subject.fingerprint != fingerprint:
        return (f"'{subject.title}' was trained on another {subject.family or 'base'} model ({subject.base_model}, "
                f"fingerprint {subject.fingerprint}); the connected MODEL's fingerprint is {fingerprint}. It may "
                "still work on a close fine-tune; for a faithful subject connect the model it was trained on")
    return None
