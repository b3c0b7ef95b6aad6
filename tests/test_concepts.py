"""Several subjects in one training run (dataset/concepts.py, issue 38 item 3): the concept list and its
file, the identifier clashes refused before any work, the draw (repeats, class pairs), the loss weight,
class images per class, and the one LoRA that names every subject. A run of one subject is unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_tiny_backend
from dreambooth_core import fileio
from dreambooth_core.adapters.metadata import read_subject
from dreambooth_core.config import TrainConfig
from dreambooth_core.dataset.concepts import read_concepts_file
from dreambooth_core.dataset.tokens import TokenError
from dreambooth_core.job import check_job, prepare_instance_images, run_job
from dreambooth_core.training import objective
from dreambooth_core.training.cache import Bucket
from dreambooth_core.training.draw import draw
from test_cli import run_cli, workspace  # noqa: F401 (workspace: a fixture)
from test_job import FolderHost


def photos(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def run_config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(steps=3, learning_rate=1e-2, num_class_images=2, class_steps=2, output_dir=str(tmp_path / "run"),
                save_name="pair", save_precision="fp32", resolution=16)
    base.update(kw)
    return TrainConfig(**base)


def test_a_concept_file_lists_the_subjects_with_folders_relative_to_it(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "concepts.json").write_text(json.dumps([
        {"instance_dir": "dog", "token": "sks", "class_noun": "dog", "repeats": 2, "loss_weight": 0.5},
        {"instance_dir": str(tmp_path / "cat"), "token": "ohwx", "class_noun": "cat", "class_dir": "cats"}]))
    dog, cat = read_concepts_file(folder / "concepts.json")
    assert (dog.instance_dir, dog.repeats, dog.loss_weight) == (str(folder.resolve() / "dog"), 2, 0.5)
    assert (cat.instance_dir, cat.class_dir, cat.repeats, cat.loss_weight) == (
        str(tmp_path / "cat"), str(folder.resolve() / "cats"), 1, 1.0)
    assert cat.phrase == "ohwx cat"
    (folder / "bad.json").write_text(json.dumps([{"token": "sks", "class_noun": "dog", "weight": 2}]))
    with pytest.raises(ValueError, match=r"bad.json\[0\]: unknown key\(s\) weight"):
        read_concepts_file(folder / "bad.json")
    (folder / "half.json").write_text(json.dumps({"concepts": [{"token": "sks", "repeats": 1.5}]}))
    with pytest.raises(ValueError, match="repeats must be a whole number"):
        read_concepts_file(folder / "half.json")


@pytest.mark.parametrize("second, message", [
    ({"token": "sks", "class_noun": "heart"}, r"identifier 'sks' is used by subject 1 \('sks star'\) and "
                                              r"subject 2 \('sks heart'\)"),
    ({"token": "star", "class_noun": "heart"}, r"identifier 'star' of subject 2 \('star heart'\) is the class "
                                               r"noun of subject 1 \('sks star'\)"),
])
def test_clashing_identifiers_are_refused_before_any_work(tmp_path, second, message):
    backend, host = make_tiny_backend(), FolderHost(tmp_path)
    concepts = [{"instance_dir": str(photos(tmp_path / "a", 3, 0)), "token": "sks", "class_noun": "star"},
                {"instance_dir": str(photos(tmp_path / "b", 3, 1)), **second}]
    with pytest.raises(TokenError, match=message):
        check_job(run_config(tmp_path, concepts=concepts), host, tokenizers=backend.tokenizers())
    assert not host.events and not (tmp_path / "class_cache").exists() and not (tmp_path / "run").exists()


def test_each_identifier_must_stay_one_token(tmp_path):
    concepts = [{"instance_dir": "a", "token": "sks", "class_noun": "star"},
                {"instance_dir": "b", "token": "xxy5syt00", "class_noun": "heart"}]
    with pytest.raises(TokenError, match="xxy5syt00"):
        check_job(run_config(tmp_path, concepts=concepts), FolderHost(tmp_path),
                  tokenizers=make_tiny_backend().tokenizers())


def test_one_concept_trains_exactly_as_the_flags_do(tmp_path):
    folder = photos(tmp_path / "star", 3, 0)
    flags = run_config(tmp_path / "flags", instance_dir=str(folder), token="sks", class_noun="star")
    listed = run_config(tmp_path / "listed", concepts=[{"instance_dir": str(folder), "token": "sks",
                                                        "class_noun": "star"}])
    files = []
    for config in (flags, listed):
        backend, host = make_tiny_backend(), FolderHost(tmp_path)
        check_job(config, host, tokenizers=backend.tokenizers())
        files.append(run_job(backend, config, prepare_instance_images(config), host).lora_path)
    a, b = load_file(files[0]), load_file(files[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_classes_get_a_class_set_each_shared_by_their_subjects_and_one_lora_names_all(tmp_path):
    backend, host = make_tiny_backend(), FolderHost(tmp_path)
    concepts = [{"instance_dir": str(photos(tmp_path / "a", 3, 0)), "token": "sks", "class_noun": "star"},
                {"instance_dir": str(photos(tmp_path / "b", 2, 1)), "token": "ohwx", "class_noun": "star",
                 "repeats": 2},
                {"instance_dir": str(photos(tmp_path / "c", 2, 2)), "token": "bnha", "class_noun": "heart",
                 "loss_weight": 0.5}]
    config = run_config(tmp_path, concepts=concepts)
    check_job(config, host, tokenizers=backend.tokenizers())
    data = prepare_instance_images(config)
    assert [(it.repeats, it.loss_weight, it.class_prompt) for it in data.items] == (
        [(1, 1.0, "a photo of a star")] * 3 + [(2, 1.0, "a photo of a star")] * 2
        + [(1, 0.5, "a photo of a heart")] * 2)
    assert [it.caption for it in data.items][::2] == ["a photo of sks star", "a photo of sks star",
                                                       "a photo of ohwx star", "a photo of bnha heart"]
    result = run_job(backend, config, data, host)
    assert result.status == "completed"
    sets = sorted(p.parent for p in (tmp_path / "class_cache").rglob("*.png"))
    assert len(set(sets)) == 2 and len(sets) == 4, "one set of 2 per class, the two stars share theirs"
    assert "'a photo of a star'" in result.class_note and "'a photo of a heart'" in result.class_note

    meta = fileio.read_metadata(result.lora_path)
    assert meta["modelspec.trigger_phrase"] == "sks star, ohwx star, bnha heart"
    assert json.loads(meta["ss_tag_frequency"]) == {"1_sks star": {"sks star": 3}, "2_ohwx star": {"ohwx star": 2},
                                                    "1_bnha heart": {"bnha heart": 2}}
    assert meta["ss_num_train_images"] == "7"
    listed = json.loads(meta["dreambooth_subjects"])
    assert [(s["token"], s["class_noun"], s["images"], s["repeats"], s["loss_weight"]) for s in listed] == [
        ("sks", "star", 3, 1, 1.0), ("ohwx", "star", 2, 2, 1.0), ("bnha", "heart", 2, 1, 0.5)]
    assert (meta["dreambooth_token"], meta["dreambooth_class_noun"]) == ("sks", "star"), "older readers: the first"
    subject = read_subject(meta)
    assert subject.phrases == ("sks star", "ohwx star", "bnha heart")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert [c["images"] for c in saved["concepts"]] == [3, 2, 2]


def test_a_class_without_class_images_is_refused_before_training(tmp_path):
    from dreambooth_core.dataset import TrainImage

    concepts = [{"instance_dir": str(photos(tmp_path / "a", 3, 0)), "token": "sks", "class_noun": "star"},
                {"instance_dir": str(photos(tmp_path / "b", 3, 1)), "token": "ohwx", "class_noun": "heart"}]
    config = run_config(tmp_path, concepts=concepts)
    host = FolderHost(tmp_path)
    check_job(config, host)
    stars = [TrainImage(Image.new("RGB", (16, 16)), "a photo of a star", "memory[0]")]
    with pytest.raises(ValueError, match="none for 'a photo of a heart'"):
        run_job(make_tiny_backend(), config, prepare_instance_images(config), host, class_items=stars)
    assert not (tmp_path / "run").exists()


def _bucket(captions, repeats=None, loss_weights=None, class_prompts=None) -> Bucket:
    n = len(captions)
    def tensor(values):
        return None if values is None else torch.tensor(values, dtype=torch.float)

    return Bucket(torch.arange(n, dtype=torch.float).view(n, 1, 1, 1).expand(n, 4, 2, 2).clone(), None,
                  list(captions), (16, 16), repeats=tensor(repeats), loss_weights=tensor(loss_weights),
                  class_prompts=class_prompts)


def _drawn(inst, cls, steps=400, batch_size=4):
    config = TrainConfig(batch_size=batch_size, class_noun="star")
    schedule = objective.DiscreteSchedule(torch.linspace(0.99, 0.01, 1000), "epsilon")
    return [draw(config, schedule, step, 0, inst, cls) for step in range(steps)]


def test_repeats_set_how_often_each_subject_is_drawn():
    captions = ["sks star"] * 2 + ["ohwx heart"] * 2

    def share(buckets) -> float:
        drawn = [c for parts, _ in _drawn(buckets, []) for c in parts[0][3]]
        return drawn.count("sks star") / len(drawn)

    assert 0.45 < share([_bucket(captions)]) < 0.55, "without repeats every image is drawn alike"
    assert 0.71 < share([_bucket(captions, repeats=[3, 3, 1, 1])]) < 0.79, "repeats 3 : 1 draw three times as often"
    # subjects in buckets of their own (another image size): the bucket is drawn as often as its repeats say
    apart = [_bucket(captions[:2], repeats=[3, 3]), _bucket(captions[2:], repeats=[1, 1])]
    assert 0.71 < share(apart) < 0.79


def test_each_prior_sample_is_a_class_image_of_its_own_subject_s_class():
    prompts = ["a photo of a star"] * 2 + ["a photo of a heart"] * 2
    inst = [_bucket(["sks star"] * 2 + ["ohwx heart"] * 2, class_prompts=prompts)]
    cls = [_bucket(["a photo of a heart"] * 3 + ["a photo of a star"] * 5)]
    pairs = [(i, c) for parts, _ in _drawn(inst, cls, steps=100) for i, c in zip(parts[0][3], parts[1][3])]
    assert {(i.split()[1], c.split()[-1]) for i, c in pairs} == {("star", "star"), ("heart", "heart")}
    # without class prompts (one class) any class image pairs with any sample, as before
    one = [(i, c) for parts, _ in _drawn([_bucket(["sks star"] * 4)], cls, steps=100)
           for i, c in zip(parts[0][3], parts[1][3])]
    assert {c for _, c in one} == {"a photo of a heart", "a photo of a star"}


def test_a_subject_s_loss_weight_multiplies_its_instance_loss_only():
    weights = [2.0, 2.0, 0.5, 0.5]
    drawn = _drawn([_bucket(["sks star"] * 2 + ["ohwx heart"] * 2, loss_weights=weights)], [], steps=5)
    for parts, weight in drawn:
        latents = parts[0][0][:, 0, 0, 0].long()  # each latent holds its image's index
        assert torch.equal(weight.samples, torch.tensor(weights)[latents]) and weight.elements is None

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 2, 2, generator=g), torch.randn(6, 4, 2, 2, generator=g)
    batch = objective.NoisedBatch(pred, torch.zeros(6), target, torch.ones(6))
    per_sample = ((pred - target) ** 2).flatten(1).mean(1)
    plain = objective.dreambooth_loss(pred, batch, 3, prior_weight=1.0)
    factors = objective.InstanceWeights(None, torch.tensor([2., 1, 0.5]))
    weighted = objective.dreambooth_loss(pred, batch, 3, 1.0, factors)
    torch.testing.assert_close(weighted.instance, (per_sample[:3] * torch.tensor([2., 1, 0.5])).mean())
    torch.testing.assert_close(weighted.prior, plain.prior)
    halves = [objective.NoisedBatch(pred[s], torch.zeros(3), target[s], torch.ones(3))
              for s in (slice(0, 3), slice(3, 6))]
    by_part = objective.dreambooth_loss_by_part([pred[:3], pred[3:]], halves, 1.0, factors)
    torch.testing.assert_close(by_part.total, weighted.total)


def test_the_command_line_trains_the_subjects_of_a_concept_file(workspace):  # noqa: F811
    folder = workspace / "pets"
    photos(folder / "star", 3, 0)
    photos(folder / "heart", 2, 1)
    (folder / "concepts.json").write_text(json.dumps([
        {"instance_dir": "star", "token": "sks", "class_noun": "star"},
        {"instance_dir": "heart", "token": "ohwx", "class_noun": "heart", "repeats": 3, "loss_weight": 2}]))
    args = ["train", "--model", str(workspace / "tiny_model"), "--resolution", "16", "--steps", "2", "--lr", "1e-2",
            "--no-prior", "--save-precision", "fp32", "--save-name", "pets"]
    proc = run_cli(*args, "--concepts", str(folder / "concepts.json"), "--output-dir", str(workspace / "out_pets"))
    assert proc.returncode == 0, proc.stderr
    assert "subject 'ohwx heart': 2 image(s), repeats 3, loss weight 2" in proc.stdout
    meta = fileio.read_metadata(workspace / "out_pets" / "pets.safetensors")
    assert meta["modelspec.trigger_phrase"] == "sks star, ohwx heart"
    assert json.loads(meta["ss_tag_frequency"]) == {"1_sks star": {"sks star": 3}, "3_ohwx heart": {"ohwx heart": 2}}
    saved = json.loads((workspace / "out_pets" / "config.json").read_text())["config"]
    assert saved["concepts"][1]["instance_dir"] == str((folder / "heart").resolve())

    (folder / "clash.json").write_text(json.dumps([{"instance_dir": "star", "token": "sks", "class_noun": "star"},
                                                   {"instance_dir": "heart", "token": "sks", "class_noun": "heart"}]))
    proc = run_cli(*args, "--concepts", str(folder / "clash.json"), "--output-dir", str(workspace / "out_clash"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "identifier 'sks' is used by subject 1 ('sks star') and subject 2 ('sks heart')" in proc.stderr
    assert not (workspace / "out_clash").exists()
