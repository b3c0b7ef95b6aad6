"""The DreamBooth nodes: Dataset → Class Images → Train → Sample Grid, on the graph's own
MODEL / CLIP / VAE.

Classic node style (INPUT_TYPES / RETURN_TYPES / FUNCTION). This module imports nothing heavy:
ComfyUI and dreambooth_core are imported inside the node functions (ComfyUI has torch, numpy and
PIL loaded already; accelerate is imported only when a training run starts).
"""
from __future__ import annotations

import hashlib
import logging
import os

from . import live, paths
from .types import CLASS_IMAGES, DATASET, DreamBoothClassImages, DreamBoothDataset

log = logging.getLogger("dreambooth")
CATEGORY = "DreamBooth"
MAX_RESOLUTION = 4096


def _samplers():
    import comfy.samplers

    return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS


def _images_to_tensor(images, size=None):
    """uint8 H×W×3 arrays or PIL images -> a ComfyUI IMAGE batch (B, H, W, 3) in [0, 1]. Images of
    other sizes are letterboxed (grey) into the largest one, so bucketed datasets preview too."""
    import numpy as np
    import torch
    from PIL import Image

    pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
    w = size[0] if size else max(im.width for im in pil)
    h = size[1] if size else max(im.height for im in pil)
    out = []
    for im in pil:
        im = im.convert("RGB")
        if im.size != (w, h):
            scale = min(w / im.width, h / im.height)
            fitted = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
            canvas = Image.new("RGB", (w, h), (128, 128, 128))
            canvas.paste(fitted, ((w - fitted.width) // 2, (h - fitted.height) // 2))
            im = canvas
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    return torch.stack(out)


def _interrupted():
    """Raise the host's interrupt exception (the UI then shows the run as interrupted)."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()


def _one(value):
    """A node input's value: the host hands an INPUT_IS_LIST node each input as a list (of one)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _each_image(value):
    """IMAGE (or MASK) inputs as one list of single images: a batch, or the list of batches a host's
    folder loader sends (one per photo, sizes may differ); None stays None."""
    if value is None:
        return None
    return [image for batch in (value if isinstance(value, list) else [value]) for image in batch]


def _folder_signature(folder: str) -> str:
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            h.update(f"{os.path.relpath(os.path.join(root, name), folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------


class DreamBoothDataset_:
    DESCRIPTION = ("Prepares the subject's photos for DreamBooth: validates and fixes every file, captions "
                   "them with the identifier token and class noun, crops them to the training resolution. "
                   "The identifier must stay ONE token in this CLIP's tokenizer.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..dreambooth_core.config import CROPS

        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP of the model you will train: the identifier token is checked "
                                             "against its tokenizer(s)."}),
                "folder": (paths.input_subfolders(), {"tooltip": "A subfolder of ComfyUI's input folder holding 3-30 "
                                                                 "photos of the subject (optional .txt captions beside them). "
                                                                 "Pick [none] to use the 'images' input or 'path'."}),
                "token": ("STRING", {"default": "sks", "tooltip": "The rare identifier the subject is bound to "
                                                                  "(e.g. sks, ohwx). It must be a single token."}),
                "class_noun": ("STRING", {"default": "dog", "tooltip": "The subject's class (dog, backpack, person): "
                                                                       "the prompt becomes 'a photo of <token> <class>'."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                                       "tooltip": "Training resolution in pixels (512 for SD1.x, 768 for SD2-v, "
                                                  "1024 for SDXL)."}),
                "crop": (list(CROPS), {"default": "center", "tooltip": "center / random: square crops; bucket: keep "
                                                                      "each photo's aspect ratio (aspect-ratio buckets)."}),
                "flip": ("BOOLEAN", {"default": False, "tooltip": "Also train on mirror images (off for asymmetric "
                                                                  "subjects, text or logos)."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Use these images instead of a folder (e.g. from Load Image nodes)."}),
                "path": ("STRING", {"default": "", "tooltip": "A folder typed by hand, relative to the input folder "
                                                              "or absolute. Only paths inside ComfyUI's input/output "
                                                              f"folders are accepted unless the server owner set "
                                                              f"{paths.ALLOW_ANY_PATH_ENV}=1."}),
                "caption_template": ("STRING", {"default": "a photo of {token} {class}",
                                                "tooltip": "Caption of photos without a .txt caption file; {token} and "
                                                           "{class} are filled in."}),
                "captions": ("STRING", {"forceInput": True,
                                        "tooltip": "One caption per image of the 'images' input, e.g. the texts of the "
                                                   "host's Load Image-Text (from Folder) node; an empty one uses the "
                                                   "caption template. {token} and {class} are filled in."}),
                "subject_mask": ("MASK", {"tooltip": "Masked loss: only the subject is learned, not the photos' "
                                                     "backgrounds. One mask per image of the 'images' input, white = "
                                                     "subject (e.g. from a segmentation node; Load Image's mask is "
                                                     "white where the image is transparent: put Invert Mask after it)."}),
                "mask_from_alpha": ("BOOLEAN", {"default": False,
                                                "tooltip": "Masked loss for a folder of cut-outs: each photo's "
                                                           "transparency is its subject mask."}),
                "dataset": (DATASET, {"tooltip": "Several subjects in one run: another DreamBooth Dataset; this "
                                                 "subject is added to its subjects, and Train makes one LoRA that "
                                                 "knows them all. Each needs its own identifier."}),
                "class_images": (CLASS_IMAGES, {"tooltip": "This subject's class images (prior preservation). "
                                                           "Needed when chained subjects are of different classes; "
                                                           "subjects of one class can share a Class Images node, "
                                                           "or use Train's class_images."}),
                "repeats": ("INT", {"default": 1, "min": 1, "max": 1000,
                                    "tooltip": "With chained subjects: how often this subject's photos are drawn "
                                               "relative to the others' (kohya's repeats: 2 = twice as often)."}),
                "loss_weight": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.05,
                                          "tooltip": "Multiplies this subject's instance loss (1: as the others)."}),
            },
        }

    # The host's folder loaders (Load Image (from Folder), Load Image-Text (from Folder)) send one
    # IMAGE per photo, of different sizes, and one caption each, as lists: the node takes every input
    # as a list (a batch or a widget value arrives as a list of one) and runs once for all of them.
    INPUT_IS_LIST = True
    RETURN_TYPES = (DATASET, "IMAGE")
    RETURN_NAMES = ("dataset", "preview")
    OUTPUT_TOOLTIPS = ("The prepared subject images, for DreamBooth Train.",
                       "The training crops exactly as the model will see them.")
    FUNCTION = "prepare"
    CATEGORY = CATEGORY

    @classmethod
    def IS_CHANGED(cls, folder=None, path="", images=None, **kwargs):
        # Re-run when the files in the folder change (the inputs alone would look the same).
        try:
            return _folder_signature(paths.resolve_dataset_folder(_one(folder), _one(path) or ""))
        except Exception:
            return ""

    def prepare(self, clip, folder, token, class_noun, resolution, crop, flip, images=None, path="",
                caption_template="a photo of {token} {class}", subject_mask=None, mask_from_alpha=False,
                captions=None, dataset=None, class_images=None, repeats=1, loss_weight=1.0):
        from ..dreambooth_core.dataset import prepare_dataset
        from ..dreambooth_core.dataset.tokens import TokenError, require_single_token
        from .comfy_backend import clip_tokenizers

        clip, folder, token, class_noun, resolution, crop, flip, path, caption_template, mask_from_alpha = map(
            _one, (clip, folder, token, class_noun, resolution, crop, flip, path, caption_template, mask_from_alpha))
        previous, class_images, repeats, loss_weight = map(_one, (dataset, class_images, repeats, loss_weight))
        images, subject_mask = _each_image(images), _each_image(subject_mask)
        token = (token or "").strip()
        class_noun = (class_noun or "").strip()
        try:
            check = require_single_token(clip_tokenizers(clip), token)
        except TokenError as exc:
            raise ValueError(f"DreamBooth Dataset: identifier token: {exc}") from None
        _check_chain(previous, token, class_noun, int(resolution), bool(flip))
        masks = "alpha" if mask_from_alpha else None
        if subject_mask is not None:
            if images is None or (path or "").strip():
                raise ValueError("DreamBooth Dataset: subject_mask goes with the 'images' input (one mask per "
                                 "image); for a folder of cut-outs turn on mask_from_alpha instead")
            masks = subject_mask
        if images is not None and not (path or "").strip():
            source, where = images, "IMAGE input"
        else:
            source = where = paths.resolve_dataset_folder(folder, path or "")
        if captions is not None and source is not images:
            raise ValueError("DreamBooth Dataset: 'captions' go with the 'images' input (one per image); a folder's "
                             "photos take their captions from .txt files beside them")
        prepared = prepare_dataset(source, token=token, class_noun=class_noun,
                                   caption_template=caption_template or "a photo of {token} {class}",
                                   resolution=int(resolution), crop=crop, flip=bool(flip), masks=masks,
                                   captions=captions)
        dataset = DreamBoothDataset(prepared, token, class_noun, caption_template, where, check.message,
                                    repeats=int(repeats), loss_weight=float(loss_weight), class_images=class_images,
                                    previous=previous)
        preview = _images_to_tensor([item.image for item in prepared.items])
        text = f"{check.message}\n{prepared.report_text()}"
        if previous is not None:
            phrases = ", ".join(repr(f"{d.token} {d.class_noun}".strip()) for d in dataset.subjects())
            text = f"subjects: {phrases}\n{text}"
        log.info("DreamBooth Dataset: %s", prepared.summary())
        return {"ui": {"text": [text]}, "result": (dataset, preview)}


def _check_chain(previous, token: str, class_noun: str, resolution: int, flip: bool) -> None:
    """A subject chained onto others: refused at once where the run would refuse it (a clashing
    identifier, another resolution or flip), naming both subjects."""
    from ..dreambooth_core.dataset.tokens import TokenError, require_distinct_identifiers

    if previous is None:
        return
    if not isinstance(previous, DreamBoothDataset):
        raise ValueError("DreamBooth Dataset: 'dataset' must come from another DreamBooth Dataset node")
    chain = previous.subjects()
    try:
        require_distinct_identifiers([(d.token, d.class_noun) for d in chain] + [(token, class_noun)])
    except TokenError as exc:
        raise ValueError(f"DreamBooth Dataset: {exc}") from None
    first = chain[0]
    for name, mine, theirs in (("resolution", resolution, first.resolution), ("flip", flip, first.flip)):
        if mine != theirs:
            raise ValueError(f"DreamBooth Dataset: {name} is {mine}, but the chained subject "
                             f"'{first.token} {first.class_noun}' has {theirs}; one run trains every subject with "
                             f"the same {name}")


class DreamBoothClassImages_:
    DESCRIPTION = ("Generates class images for prior preservation with the loaded model (the host's KSampler), "
                   "cached on disk under output/dreambooth_class_images: queueing again reuses them, asking "
                   "for more only generates the missing ones.")

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _samplers()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the class images are sampled from (the base model you train)."}),
                "clip": ("CLIP", {"tooltip": "The CLIP that encodes the class prompt."}),
                "vae": ("VAE", {"tooltip": "The VAE that decodes the samples."}),
                "class_prompt": ("STRING", {"default": "a photo of a dog", "multiline": True,
                                            "tooltip": "What a generic member of the subject's class looks like: "
                                                       "'a photo of a <class>'."}),
                "count": ("INT", {"default": 100, "min": 1, "max": 10000,
                                  "tooltip": "How many class images (the paper uses ~200; 50-100 works)."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 1000, "tooltip": "Sampling steps per image."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": (samplers, {"default": "dpmpp_2m", "tooltip": "The sampling algorithm."}),
                "scheduler": (schedulers, {"default": "karras", "tooltip": "The noise schedule of the sampler."}),
                # control_after_generate=False: the front end would otherwise add its "randomize"
                # control to an input named seed, and a new seed each queue means a new cache.
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Image i uses seed + i, so the set is reproducible and can be topped up."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                                       "tooltip": "Width and height of the class images (use the training resolution)."}),
            },
            "optional": {
                "negative_prompt": ("STRING", {"default": "", "multiline": True,
                                               "tooltip": "What the class images should not show."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},  # which node the page's live view belongs to
        }

    RETURN_TYPES = (CLASS_IMAGES, "IMAGE")
    RETURN_NAMES = ("class_images", "preview")
    OUTPUT_TOOLTIPS = ("The class-image set, for DreamBooth Train (prior preservation).",
                       "Up to 16 of the class images.")
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(self, model, clip, vae, class_prompt, count, steps, cfg, sampler_name, scheduler, seed, resolution,
                 negative_prompt="", unique_id=None):
        import comfy.model_management as mm
        import comfy.utils
        from PIL import Image

        from ..dreambooth_core.backends.base import SampleSettings
        from ..dreambooth_core.class_images.cache import ensure_class_images
        from .comfy_backend import ComfyBackend

        backend = ComfyBackend(model, clip, vae)
        settings = SampleSettings(steps=int(steps), guidance=float(cfg), sampler=f"{sampler_name}:{scheduler}",
                                  negative_prompt=negative_prompt or "", width=int(resolution), height=int(resolution))
        bar = comfy.utils.ProgressBar(int(count) * int(steps))
        state = {"done": 0, "step": 0, "first": None}
        _, node_id = live.executing_ids(unique_id)

        def on_images(done, total):
            state["done"], state["step"] = done, 0
            if state["first"] is None:  # the first call says how many were valid in the cache
                state["first"] = done
            live.report_class_images(node_id, total, done - state["first"], state["first"], done)
            bar.update_absolute(done * int(steps), int(total) * int(steps))

        def on_step():  # the host's hook raises on Cancel here, mid-image
            state["step"] += 1
            bar.update_absolute(min(state["done"] * int(steps) + state["step"], int(count) * int(steps)))

        backend.sampler_step_hook = on_step
        image_set = ensure_class_images(backend, paths.class_image_root(), class_prompt.strip(), int(count), settings,
                                        seed=int(seed), batch_size=1, progress=on_images,
                                        should_stop=mm.processing_interrupted)
        live.report_class_images(node_id, image_set.count, image_set.generated, image_set.reused,
                                 len(image_set.paths), str(image_set.folder))
        if not image_set.complete:
            _interrupted()
        preview = _images_to_tensor([Image.open(p).convert("RGB") for p in image_set.paths[:16]])
        text = (f"{image_set.count} class images: {image_set.generated} generated, {image_set.reused} reused "
                f"from the cache in {image_set.folder}")
        log.info("DreamBooth Class Images: %s", text)
        return {"ui": {"text": [text], "generated": [image_set.generated], "reused": [image_set.reused]},
                "result": (DreamBoothClassImages(image_set, int(resolution)), preview)}


class DreamBoothTrain_:
    DESCRIPTION = ("Trains DreamBooth (LoRA or full fine-tune, with prior preservation) on the connected MODEL/CLIP "
                   "in ComfyUI's process. The inputs are never modified: the outputs are new MODEL/CLIP objects "
                   "carrying the trained weights. The LoRA is saved to models/loras (LoraLoader lists it); "
                   "Cancel keeps a checkpoint of the last finished step that 'resume' continues from.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..dreambooth_core.config import OPTIMIZERS, PRIOR_PASSES

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model to train (left unchanged for other nodes)."}),
                "clip": ("CLIP", {"tooltip": "The base model's CLIP (its text encoder trains if 'train_text_encoder')."}),
                "vae": ("VAE", {"tooltip": "Encodes the training images into latents."}),
                "dataset": (DATASET, {"tooltip": "The subject's images from DreamBooth Dataset."}),
                "mode": (["lora", "full"], {"default": "lora",
                                            "tooltip": "lora: small adapter file (kohya keys); full: train every "
                                                       "weight (needs much more memory, saves a whole checkpoint)."}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "LoRA rank (4-32 is typical)."}),
                "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                    "tooltip": "LoRA alpha; scale = alpha / rank. 0 means alpha = rank (scale 1)."}),
                "train_text_encoder": ("BOOLEAN", {"default": False,
                                                   "tooltip": "Also train the text encoder (better identity, more memory)."}),
                "steps": ("INT", {"default": 400, "min": 1, "max": 100000,
                                  "tooltip": "Optimizer steps (the paper: ~200 per 4-6 photos at lr 5e-6 full, "
                                             "~400-800 for LoRA at 1e-4)."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-8, "max": 1.0, "step": 1e-6, "round": False,
                                            "tooltip": "1e-4 for LoRA; about 5e-6 for full fine-tuning."}),
                "prior_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                           "tooltip": "Weight λ of the prior-preservation loss (needs class images; "
                                                      "0 turns it off)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Instance images per step (as many class images are added)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Seeds LoRA initialisation, sampling of images, noise and timesteps "
                                            "(fixed: queueing again reuses the trained result)."}),
                "save_name": ("STRING", {"default": "dreambooth_lora",
                                         "tooltip": "File name of the LoRA in models/loras (a plain name, no folders); "
                                                    "the run's checkpoint and loss curve go to output/dreambooth/<name>/."}),
                "resume": ("BOOLEAN", {"default": False,
                                       "tooltip": "Continue from output/dreambooth/<name>/checkpoint.safetensors "
                                                  "(left by Cancel or by checkpoint_every) with the same settings."}),
                "checkpoint_every": ("INT", {"default": 0, "min": 0, "max": 100000,
                                             "tooltip": "Save a resumable checkpoint every N steps (0: only on Cancel "
                                                        "and at the end)."}),
            },
            "optional": {
                "class_images": (CLASS_IMAGES, {"tooltip": "Class images from DreamBooth Class Images: turns on prior "
                                                           "preservation (keeps the class from drifting)."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False,
                                                       "tooltip": "Recompute activations in the backward pass: less "
                                                                  "memory, ~30% slower. Turn it on for large "
                                                                  "models (Flux, SD3, SDXL at 1024 px)."}),
                "training_dtype": (["auto", "fp32", "bf16"], {"default": "auto",
                                                             "tooltip": "Compute precision of the UNet while training "
                                                                        "(auto: fp32 on CPU, bf16 where the GPU has it)."}),
                "lora_targets": (["transformer", "attention"], {"default": "transformer",
                                                                "tooltip": "Which layers the LoRA adapts: every linear "
                                                                           "layer of the transformer blocks (kohya's "
                                                                           "set), or only the attention projections "
                                                                           "(smaller file, less memory)."}),
                "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.95, "step": 0.05,
                                              "tooltip": "Share of subject images trained with an empty caption "
                                                         "(kohya's caption dropout), so that CFG's unconditional "
                                                         "side knows the subject too (0: off; 0.05-0.1 typical)."}),
                "optimizer": (list(OPTIMIZERS), {"default": "adamw",
                                                 "tooltip": "adamw (default); adafactor: factored optimizer "
                                                            "state, least memory, nothing to install; adamw8bit: "
                                                            "8-bit state, needs bitsandbytes and a CUDA GPU."}),
                "preview_every": ("INT", {"default": 0, "min": 0, "max": 100000,
                                          "tooltip": "Every N steps, sample the instance prompt and show the image on "
                                                     "this node (0: off; each preview costs one full sampling)."}),
                "prior_pass": (list(PRIOR_PASSES), {"default": "joint",
                                                    "tooltip": "With class images: joint runs subject and class "
                                                               "images in one pass (fastest); separate runs them one "
                                                               "after the other, with the same result and about half "
                                                               "the activation memory."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},  # which node the page's live view belongs to
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE", "LORA_MODEL")
    RETURN_NAMES = ("model", "clip", "lora_path", "loss_curve", "lora")
    OUTPUT_TOOLTIPS = ("The trained model (a new MODEL; the input is unchanged): connect it to a KSampler.",
                       "The CLIP to encode prompts for the trained model (trained if 'train_text_encoder').",
                       "Where the LoRA (or, in full mode, the checkpoint) was saved.",
                       "The loss per step.",
                       "The saved LoRA's weights, for the host's Load LoRA Model node (LoraModelLoader; its "
                       "bypass mode suits fp8 or offloaded base weights). Empty in full mode.")
    FUNCTION = "train"
    CATEGORY = CATEGORY

    def train(self, model, clip, vae, dataset, mode, rank, alpha, train_text_encoder, steps, learning_rate,
              prior_weight, batch_size, seed, save_name, resume, checkpoint_every, class_images=None,
              gradient_checkpointing=False, training_dtype="auto", lora_targets="transformer", preview_every=0,
              caption_dropout=0.0, optimizer="adamw", prior_pass="joint", unique_id=None):
        import comfy.utils
        import torch

        from ..dreambooth_core.config import TrainConfig
        from ..dreambooth_core.job import check_job, run_job
        from ..dreambooth_core.adapters import LoRAError
        from ..dreambooth_core.plots import loss_curve_image
        from .comfy_backend import ComfyBackend
        from .train_host import TrainHost

        if not isinstance(dataset, DreamBoothDataset):
            raise ValueError("DreamBooth Train: 'dataset' must come from a DreamBooth Dataset node")
        subjects = dataset.subjects()
        sets = _class_sets(subjects, class_images) if prior_weight > 0 else [None] * len(subjects)
        prior = sets[0] is not None
        class_items = None
        if prior:
            distinct = list({id(s): s for s in sets}.values())
            class_items = [item for s in distinct
                           for item in s.image_set.load(resolution=dataset.resolution, crop="center").items]
        data, concepts = _training_set(subjects, sets)
        config = TrainConfig(
            token=subjects[0].token, class_noun=subjects[0].class_noun,
            instance_prompt=subjects[0].caption_template or None,
            class_prompt=sets[0].prompt if prior else None, resolution=dataset.resolution, crop=data.crop,
            flip=dataset.flip, prior=prior, prior_weight=float(prior_weight),
            caption_dropout=float(caption_dropout), concepts=concepts if len(subjects) > 1 else [],
            num_class_images=len(class_items) if class_items else 1, mode=mode, rank=int(rank),
            alpha=float(alpha) if alpha > 0 else None, lora_targets=lora_targets,
            train_text_encoder=bool(train_text_encoder),
            steps=int(steps), learning_rate=float(learning_rate), batch_size=int(batch_size), seed=int(seed),
            gradient_checkpointing=bool(gradient_checkpointing), mixed_precision="no",
            save_name=save_name.strip(), checkpoint_every=int(checkpoint_every),
            resume=bool(resume), sample_every=int(preview_every or 0), model="comfyui", optimizer=optimizer,
            prior_pass=prior_pass)
        host = TrainHost()
        try:
            check_job(config, host)
        except (LoRAError, ValueError) as exc:
            raise ValueError(f"DreamBooth Train: {exc}") from None
        stem = config.save_name
        config.output_dir = paths.run_dir(stem)

        backend = ComfyBackend(model, clip, vae, mode=mode, train_text_encoder=bool(train_text_encoder))
        config.model = backend.describe()
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(training_dtype) or backend.default_training_dtype()
        backend.set_training_dtype(dtype)
        prompt_id, node_id = live.executing_ids(unique_id)
        with live.LiveRun(node_id, int(steps), prompt_id, label=stem) as run:
            host.run, host.bar = run, comfy.utils.ProgressBar(int(steps))
            log.info("DreamBooth Train: %s, %d steps, %s, device %s, compute %s -> %s", mode, steps,
                     "prior preservation" if prior else "no prior", backend.device, dtype, config.output_dir)
            try:
                result = run_job(backend, config, data, host, class_items=class_items)
            finally:
                backend.release()
            if result.status == "cancelled":
                text = live.cancelled_text(result.step, result.checkpoint_path)
                log.info("DreamBooth Train: %s", text)
                run.finish("interrupted", message=text)
                _interrupted()

            saved = str(result.lora_path) if mode == "lora" else (result.full_paths[0] if result.full_paths
                                                                   else str(config.output_dir))
            out_model, out_clip = backend.result()
            curve = _images_to_tensor([loss_curve_image(result.history)])
            first = result.history[0]["loss"] if result.history else float("nan")
            last = result.history[-1]["loss"] if result.history else float("nan")
            text = f"{result.step} steps, loss {first:.4g} -> {last:.4g}; saved {saved}"
            log.info("DreamBooth Train: %s", text)
            run.finish("completed", lora_path=saved, message=text)
            lora = comfy.utils.load_torch_file(saved) if mode == "lora" else {}
            return {"ui": {"text": [text], "lora_path": [saved]},
                    "result": (out_model, out_clip, saved, curve, lora)}


def _class_sets(subjects, shared):
    """Each subject's class images: its Dataset node's own, else Train's `class_images` (None: no prior
    preservation). Refused, naming the subjects, where some have class images and others none, or
    where Train's one set would serve subjects of several classes."""
    sets = [d.class_images or shared for d in subjects]
    if all(s is None for s in sets):
        return sets
    lacking = [f"'{d.token} {d.class_noun}'" for d, s in zip(subjects, sets) if s is None]
    if lacking:
        raise ValueError(f"DreamBooth Train: prior preservation needs class images for every subject; "
                         f"{', '.join(lacking)} has none: connect a DreamBooth Class Images node of its class to its "
                         "Dataset node's class_images (or set prior_weight to 0)")
    nouns = sorted({d.class_noun for d, s in zip(subjects, sets) if s is shared})
    if len(nouns) > 1:
        raise ValueError(f"DreamBooth Train: class_images ({shared.prompt!r}) would serve subjects of several "
                         f"classes ({', '.join(nouns)}): connect each class's DreamBooth Class Images to the "
                         "class_images input of its subjects' Dataset nodes")
    return sets


def _training_set(subjects, sets):
    """The chained subjects' photos as one training set, and the concepts the run's config records
    (dreambooth_core.dataset.concepts): each image carries its subject's repeats, loss weight and the
    prompt of its class images, which pairs its prior samples with them."""
    from ..dreambooth_core.dataset.concepts import Concept, combine

    parts = [(Concept(None, d.token, d.class_noun, d.repeats, d.loss_weight, images=len(d.prepared.items)),
              d.prepared, s.prompt if s is not None else "") for d, s in zip(subjects, sets)]
    return combine(parts), [c.to_dict() for c, _, _ in parts]


class DreamBoothSampleGrid_:
    DESCRIPTION = ("Samples the subject in new contexts (the paper's applications: recontextualization, art "
                   "renditions, property modification, accessories, class hybrids, product shots) as a labelled "
                   "grid: one row per prompt, one column per seed.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..dreambooth_core.sampling.prompts import PROMPT_SETS

        samplers, schedulers = _samplers()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The trained model (from DreamBooth Train, or a LoRA-loaded model)."}),
                "clip": ("CLIP", {"tooltip": "The CLIP that goes with the model."}),
                "vae": ("VAE", {"tooltip": "Decodes the samples."}),
                "identifier": ("STRING", {"default": "sks", "tooltip": "The identifier token the subject was trained on."}),
                "class_noun": ("STRING", {"default": "dog", "tooltip": "The subject's class noun."}),
                "prompt_set": (["all", *PROMPT_SETS, "custom"], {"default": "recontextualization",
                                                                 "tooltip": "A built-in prompt set, all of them, or "
                                                                            "'custom' for the prompts below."}),
                "custom_prompts": ("STRING", {"default": "a photo of {token} {class} on the moon", "multiline": True,
                                              "tooltip": "One prompt per line, used when prompt_set is 'custom'; "
                                                         "{token} and {class} are filled in."}),
                "seeds": ("STRING", {"default": "0, 1", "tooltip": "Comma-separated seeds: one column per seed."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 1000, "tooltip": "Sampling steps per image."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": (samplers, {"default": "dpmpp_2m", "tooltip": "The sampling algorithm."}),
                "scheduler": (schedulers, {"default": "karras", "tooltip": "The noise schedule of the sampler."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                                       "tooltip": "Width and height of each image."}),
            },
            "optional": {
                "negative_prompt": ("STRING", {"default": "", "multiline": True,
                                               "tooltip": "What the images should not show."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("grid", "images")
    OUTPUT_TOOLTIPS = ("The labelled grid.", "The individual images (row by row).")
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, clip, vae, identifier, class_noun, prompt_set, custom_prompts, seeds, steps, cfg,
               sampler_name, scheduler, resolution, negative_prompt=""):
        import comfy.utils

        from ..dreambooth_core.backends.base import SampleSettings
        from ..dreambooth_core.sampling.prompts import fill, prompt_set as named_set, sample_grid
        from .comfy_backend import ComfyBackend

        token, noun = identifier.strip(), class_noun.strip()
        if prompt_set == "custom":
            prompts = [fill(line.strip(), token, noun) for line in custom_prompts.splitlines() if line.strip()]
            if not prompts:
                raise ValueError("DreamBooth Sample Grid: prompt_set is 'custom' but custom_prompts is empty")
        else:
            prompts = named_set(prompt_set, token, noun)
        try:
            seed_list = [int(s) for s in seeds.replace(";", ",").split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"DreamBooth Sample Grid: seeds {seeds!r}: give whole numbers separated by commas") from None
        if not seed_list:
            raise ValueError("DreamBooth Sample Grid: give at least one seed")
        backend = ComfyBackend(model, clip, vae)
        settings = SampleSettings(steps=int(steps), guidance=float(cfg), sampler=f"{sampler_name}:{scheduler}",
                                  negative_prompt=negative_prompt or "", width=int(resolution), height=int(resolution))
        bar = comfy.utils.ProgressBar(len(prompts) * len(seed_list) * int(steps))
        backend.sampler_step_hook = lambda: bar.update(1)
        grid, rows = sample_grid(backend, prompts, seed_list, settings, title=f"{token} {noun}")
        flat = [im for row in rows for im in row]
        return (_images_to_tensor([grid]), _images_to_tensor(flat))


NODE_CLASS_MAPPINGS = {
    "DreamBoothDataset": DreamBoothDataset_,
    "DreamBoothClassImages": DreamBoothClassImages_,
    "DreamBoothTrain": DreamBoothTrain_,
    "DreamBoothSampleGrid": DreamBoothSampleGrid_,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamBoothDataset": "DreamBooth Dataset",
    "DreamBoothClassImages": "DreamBooth Class Images",
    "DreamBoothTrain": "DreamBooth Train",
    "DreamBoothSampleGrid": "DreamBooth Sample Grid",
}

live.register_routes()  # GET /dreambooth/runs: a page reloaded mid-run picks the training up again
