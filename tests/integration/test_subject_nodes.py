"""DreamBooth Load Subject and Subject Prompt, in-process on the host's own objects (both host versions).

A subject trained by the Train node (one step) describes itself (nodes read it back), loads through the
host's LoraLoader onto MODEL and CLIP (its weights reach the sampled image), chains with a second subject
(both LoRAs' patches present, both phrases out), and warns, without failing, on a MODEL of another base.
"""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _nodes(pack):
    return {k: v() for k, v in pack.NODE_CLASS_MAPPINGS.items()}


def _module(pack, name):
    import importlib

    return importlib.import_module(f"{pack.__name__}.{name}")


@pytest.fixture(scope="module")
def trained(host, pack, loaded):
    """Two subjects in models/loras: 'subj_dog' by the Train node (1 step), 'subj_cat' written through the
    core from a network with random weights (a strong, cheap second LoRA); and a file from elsewhere."""
    from PIL import Image

    model, clip, vae = loaded
    folder = host.base / "input" / "subject_nodes"
    folder.mkdir(exist_ok=True)
    for i in range(2):
        img = np.full((64, 64, 3), 60 + 90 * i, np.uint8)
        img[16:48, 16:48] = (200, 30, 30)
        Image.fromarray(img).save(folder / f"{i}.png")
    n = _nodes(pack)
    with torch.inference_mode():
        ds = n["DreamBoothDataset"].prepare(clip, "subject_nodes", "sks", "dog", 64, "center", False)["result"][0]
        out = n["DreamBoothTrain"].train(model, clip, vae, ds, "lora", 2, 0.0, False, 1, 5e-2, 0.0, 1, 0,
                                         "subj_dog", False, 0)
    dog_path = out["result"][2]

    core = _module(pack, "dreambooth_core")
    backend = _module(pack, "nodes.comfy_backend").ComfyBackend(model, clip, vae)
    adapters = _module(pack, "dreambooth_core.adapters")
    meta = _module(pack, "dreambooth_core.adapters.metadata")
    targets = backend.lora_targets(True, True)
    torch.manual_seed(0)
    with torch.inference_mode(False):
        network = adapters.LoRANetwork(targets, rank=2)
        for adapter in network.adapters.values():
            torch.nn.init.normal_(adapter.lora_up.weight, std=0.5)
    config = core.config.TrainConfig(token="zwx", class_noun="cat", save_name="subj_cat", resolution=64, rank=2)
    loras = host.get_folder_paths("loras")[0]
    cat_path = adapters.save_lora(network, f"{loras}/subj_cat.safetensors",
                                  meta.lora_metadata(config, backend, 1, images=2, thumbnail=None))
    from safetensors.torch import load_file, save_file

    save_file(load_file(dog_path), f"{loras}/someone_elses.safetensors")  # no metadata: not ours
    return {"dog": dog_path, "cat": str(cat_path)}


def _latent(model, clip, prompt, seed=0):
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 3, 5.0, "euler", "normal", pos,
                                   neg, latent, seed=seed, disable_pbar=True)


def test_the_trained_file_describes_its_subject_and_its_base(pack, loaded, trained):
    from safetensors import safe_open

    model = loaded[0]
    with safe_open(trained["dog"], framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.trigger_phrase"] == "sks dog" and meta["dreambooth_base_family"] == "sd1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["dreambooth_base_fingerprint"] == _module(pack, "nodes.model_identity").model_fingerprint(model)
    assert meta["dreambooth_thumbnail_source"] == "sample", "the host samples: the picture is of the trained subject"
    assert meta["modelspec.thumbnail"].startswith("data:image/jpeg;base64,")
    assert json.loads(meta["ss_tag_frequency"]) == {"1_sks dog": {"sks dog": 2}}
    assert (meta["dreambooth_resolution"], meta["ss_steps"], meta["dreambooth_rank"]) == ("64", "1", "2")


def test_only_the_packs_subjects_are_listed_with_their_previews(pack, trained):
    node = pack.NODE_CLASS_MAPPINGS["DreamBoothLoadSubject"]
    choices = node.INPUT_TYPES()["required"]["subject"][0]
    assert {"subj_dog.safetensors", "subj_cat.safetensors"} <= set(choices)
    assert "someone_elses.safetensors" not in choices
    listing = {s["name"]: s for s in _module(pack, "nodes.subjects").listing()}
    assert listing["subj_dog.safetensors"]["phrase"] == "sks dog"
    assert listing["subj_dog.safetensors"]["thumbnail"].startswith("data:image/jpeg;base64,")
    with pytest.raises(ValueError, match="not made by DreamBooth.*stock Load LoRA"):
        node().load(None, None, "someone_elses.safetensors", 1.0, 1.0)
    with pytest.raises(ValueError, match="'nope.safetensors' is not in the loras folder"):
        node().load(None, None, "nope.safetensors", 1.0, 1.0)


def test_load_subject_applies_the_lora_like_the_stock_loader(pack, loaded, trained, caplog):
    import nodes as host_nodes

    model, clip, _ = loaded
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        out = pack.NODE_CLASS_MAPPINGS["DreamBoothLoadSubject"]().load(model, clip, "subj_cat.safetensors", 1.0, 1.0)
        stock = host_nodes.LoraLoader().load_lora(model, clip, "subj_cat.safetensors", 1.0, 1.0)
    m, c, phrase = out["result"]
    assert phrase == "zwx cat" and out["ui"]["text"] == ["zwx cat (sd1)"]
    assert "warning" not in caplog.text.lower() and "lora key not loaded" not in caplog.text
    assert set(m.patches) == set(stock[0].patches) and m.patches, "the LoRA's weights did not reach the MODEL"
    assert set(c.patcher.patches) == set(stock[1].patcher.patches) and c.patcher.patches
    base = _latent(model, clip, "a photo of zwx cat")
    mine = _latent(m, c, "a photo of zwx cat")
    assert not torch.equal(base, mine), "the subject does not change the sampled image"
    assert torch.equal(mine, _latent(stock[0], stock[1], "a photo of zwx cat")), "not what the stock loader gives"
    assert torch.equal(base, _latent(model, clip, "a photo of zwx cat")), "the input MODEL was changed"


def test_chained_subjects_stack_and_both_phrases_fill_the_prompt(pack, loaded, trained, caplog):
    model, clip, _ = loaded
    load = pack.NODE_CLASS_MAPPINGS["DreamBoothLoadSubject"]
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        m1, c1, dog = load().load(model, clip, "subj_dog.safetensors", 1.0, 1.0)["result"]
        _latent(m1, c1, "x")  # the host merges the first LoRA into the weights in place while it samples
        second = load().load(m1, c1, "subj_cat.safetensors", 1.0, 0.5)
    m2, c2, cat = second["result"]
    assert "warning" not in second["ui"]["text"][0], "the first subject's patches were taken for another base"
    dog_keys = set(load().load(model, clip, "subj_dog.safetensors", 1.0, 1.0)["result"][0].patches)
    cat_keys = set(load().load(model, clip, "subj_cat.safetensors", 1.0, 1.0)["result"][0].patches)
    assert dog_keys and cat_keys and dog_keys | cat_keys <= set(m2.patches)
    both = [k for k in dog_keys & cat_keys]
    assert both and all(len(m2.patches[k]) == 2 for k in both), "a module should carry both subjects' LoRAs"
    assert not torch.equal(_latent(m1, c1, "a"), _latent(m2, c2, "a"))
    prompt = pack.NODE_CLASS_MAPPINGS["DreamBoothSubjectPrompt"]()
    assert prompt.fill("a photo of {subject} and {subject_2} on a beach", dog, subject_2=cat) == \
        ("a photo of sks dog and zwx cat on a beach",)
    assert prompt.fill("on a beach", dog) == ("sks dog, on a beach",)
    with pytest.raises(ValueError, match=r"Subject Prompt: text uses \{subject_3\}.*subject_3"):
        prompt.fill("{subject} with {subject_3}", dog)
    assert "WARNING" not in caplog.text


@pytest.mark.parametrize("changed, words", [
    ({"dreambooth_base_family": "sdxl"}, ["trained on a sdxl model", "the connected MODEL is sd1"]),
    ({"dreambooth_base_fingerprint": "0123456789abcdef"}, ["fingerprint 0123456789abcdef", "another sd1 model"]),
])
def test_a_subject_of_another_base_warns_on_the_node_and_still_loads(pack, host, loaded, trained, caplog, changed,
                                                                    words):
    fileio = _module(pack, "dreambooth_core.fileio")
    loras = host.get_folder_paths("loras")[0]
    name = f"other_{next(iter(changed))}.safetensors"
    shutil.copyfile(trained["dog"], f"{loras}/{name}")
    fileio.add_metadata(f"{loras}/{name}", changed)
    model, clip, _ = loaded
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        out = pack.NODE_CLASS_MAPPINGS["DreamBoothLoadSubject"]().load(model, clip, name, 1.0, 1.0)
    text = out["ui"]["text"][0]
    assert text.startswith("warning: ")
    for word in words:
        assert word in text and word in caplog.text
    assert out["result"][2] == "sks dog" and out["result"][0].patches, "a warning must not stop the subject loading"
