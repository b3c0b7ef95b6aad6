"""A trained subject's file describes itself (adapters/metadata.py): what a later user needs, in the keys
kohya's readers (the WebUI's LoRA cards) and model-spec readers look for, also after resume and for a
full fine-tune's checkpoint; the base fingerprint a loader recomputes from a loaded model."""
from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from conftest import make_tiny_backend
from dreambooth_core import fileio
from dreambooth_core.adapters.metadata import (base_mismatch, read_subject, subject_phrase, thumbnail_uri,
                                               weights_fingerprint)
from dreambooth_core.training.trainer import Callbacks, train
from test_trainer import CLASS, INSTANCE, config


def _thumbnail(meta: dict) -> Image.Image:
    head, data = meta["modelspec.thumbnail"].split(",", 1)
    assert head == "data:image/jpeg;base64"
    assert json.loads(meta["ssmd_cover_images"]) == [data]  # the WebUI card's picture: the same JPEG
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _check_subject(meta: dict, steps: int, fingerprint: str) -> None:
    assert meta["modelspec.trigger_phrase"] == "sks star" == subject_phrase("sks", "star")
    assert meta["modelspec.title"] == meta["ss_output_name"] == "dreambooth_lora"
    assert meta["dreambooth_token"] == "sks" and meta["dreambooth_class_noun"] == "star"
    assert meta["dreambooth_instance_prompt"] == "a photo of sks star"
    assert meta["dreambooth_base_family"] == "sd1" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["dreambooth_base_fingerprint"] == fingerprint
    assert meta["ss_steps"] == meta["dreambooth_steps"] == str(steps)
    assert meta["dreambooth_resolution"] == "16" and meta["ss_resolution"] == "(16, 16)"
    assert meta["modelspec.resolution"] == "16x16"
    assert json.loads(meta["ss_tag_frequency"]) == {"1_sks star": {"sks star": 3}}
    assert meta["ss_num_train_images"] == "3"


def test_a_lora_records_the_subject_its_base_and_a_sample_of_it(tmp_path):
    backend = make_tiny_backend()
    fingerprint = weights_fingerprint(backend.unet.state_dict())
    result = train(backend, config(tmp_path, steps=2), INSTANCE, CLASS)
    meta = fileio.read_metadata(result.lora_path)
    _check_subject(meta, 2, fingerprint)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_network_dim"] == meta["dreambooth_rank"] == "4"
    assert meta["dreambooth_thumbnail_source"] == "sample"
    thumb = _thumbnail(meta)
    assert thumb.format == "JPEG" and max(thumb.size) <= 128
    # The sample, not the first photo: the tiny model draws noise, the photo is the photo.
    photo = Image.open(io.BytesIO(base64.b64decode(thumbnail_uri(INSTANCE[0].image).split(",", 1)[1])))
    assert thumb.tobytes() != photo.tobytes()
    subject = read_subject(meta)
    assert (subject.phrase, subject.family, subject.fingerprint) == ("sks star", "sd1", fingerprint)
    assert subject.thumbnail == meta["modelspec.thumbnail"]


def test_the_last_preview_is_the_picture_and_a_released_model_shows_the_first_photo(tmp_path):
    previews = []
    result = train(make_tiny_backend(), config(tmp_path / "a", steps=2, sample_every=2), INSTANCE, CLASS,
                   Callbacks(on_preview=lambda step, images: previews.append(images[0])))
    meta = fileio.read_metadata(result.lora_path)
    assert meta["modelspec.thumbnail"] == thumbnail_uri(previews[-1])
    released = train(make_tiny_backend(), config(tmp_path / "b", steps=1, train_text_encoder=False), INSTANCE, CLASS,
                     release_frozen=True)
    meta = fileio.read_metadata(released.lora_path)
    assert meta["dreambooth_thumbnail_source"] == "instance image"
    assert meta["modelspec.thumbnail"] == thumbnail_uri(INSTANCE[0].image)
    unsampled = train(make_tiny_backend(), config(tmp_path / "c", steps=1, thumbnail_steps=0), INSTANCE, CLASS)
    meta = fileio.read_metadata(unsampled.lora_path)  # thumbnail_steps=0: no sampling, the first photo
    assert meta["dreambooth_thumbnail_source"] == "instance image"
    assert meta["modelspec.thumbnail"] == thumbnail_uri(INSTANCE[0].image)


def test_a_resumed_run_writes_the_same_description(tmp_path):
    backend = make_tiny_backend()
    fingerprint = weights_fingerprint(backend.unet.state_dict())
    calls = {"n": 0}

    def stop_after_one() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    first = train(backend, config(tmp_path, steps=3), INSTANCE, CLASS, Callbacks(should_stop=stop_after_one))
    assert first.status == "cancelled"
    resumed = train(make_tiny_backend(), config(tmp_path, steps=3, resume=True), INSTANCE, CLASS)
    meta = fileio.read_metadata(resumed.lora_path)
    _check_subject(meta, 3, fingerprint)
    assert meta["dreambooth_thumbnail_source"] == "sample"


def test_a_full_fine_tune_records_the_base_it_started_from(tmp_path):
    backend = make_tiny_backend()
    fingerprint = weights_fingerprint(backend.unet.state_dict())
    result = train(backend, config(tmp_path, steps=1, mode="full", learning_rate=1e-3, train_text_encoder=False),
                   INSTANCE, CLASS)
    assert weights_fingerprint(backend.unet.state_dict()) != fingerprint, "full fine-tuning changed nothing"
    unet = next(p for p in result.full_paths if "unet" in p)
    meta = fileio.read_metadata(unet)
    _check_subject(meta, 1, fingerprint)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["dreambooth_kind"] == "checkpoint"
    from safetensors.torch import load_file

    assert load_file(unet).keys() == backend.unet.state_dict().keys()  # the tensors survive the new header


def test_add_metadata_keeps_every_tensor_and_merges_the_header(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(5, dtype=torch.float16)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"kept": "1"})
    fileio.add_metadata(path, {"new": "é" * 3})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"kept": "1", "new": "ééé"}
    assert all(torch.equal(v, load_file(str(path))[k]) for k, v in tensors.items())
    assert fileio.read_metadata(path) == {"kept": "1", "new": "ééé"}
    (tmp_path / "bad.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        fileio.read_metadata(tmp_path / "bad.safetensors")


def test_the_fingerprint_is_the_same_for_fp32_and_fp16_loads_and_sees_another_base():
    unet = make_tiny_backend().unet
    state = unet.state_dict()
    a = weights_fingerprint(state)
    assert len(a) == 16 and a == weights_fingerprint({k: v.half() for k, v in state.items()})
    assert a != weights_fingerprint(make_tiny_backend(seed=1).unet.state_dict())


def test_a_mismatch_is_named_and_a_file_from_elsewhere_is_no_subject():
    subject = read_subject({"dreambooth_version": "1", "dreambooth_token": "sks", "dreambooth_class_noun": "dog",
                            "modelspec.title": "rex", "dreambooth_base_family": "sd1",
                            "dreambooth_base_fingerprint": "abc", "dreambooth_base_model": "ComfyUI SD15"})
    assert subject.phrase == "sks dog"  # older files: from the token and class noun
    assert base_mismatch(subject, "sd1", "abc") is None
    family = base_mismatch(subject, "sdxl", "abc")
    assert "trained on a sd1 model" in family and "sdxl" in family
    assert "fingerprint abc" in base_mismatch(subject, "sd1", "def")
    assert read_subject({"ss_output_name": "someone_elses"}) is None
