"""Regional composition (dreambooth_core.sampling.regional) and `eval --multi` (evaluation.multi).

The sampler must be the diffusers pipeline's sampler where there is one region and no adapter, and a
region must see its own adapters only; the eval's metrics must tell a subject's colours from the
other's, and a tiny run must produce the table, in which regional composition reproduces each subject
alone (it is built to) while stacking does not.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dreambooth_core.adapters.network import LoRANetwork  # noqa: E402
from dreambooth_core.backends.base import SampleSettings  # noqa: E402
from dreambooth_core.embedded import toyworld as tw  # noqa: E402
from dreambooth_core.evaluation import multi  # noqa: E402
from dreambooth_core.sampling.regional import Region, RegionError, noise_for, region_masks, sample_regions  # noqa: E402

SETTINGS = SampleSettings(width=32, height=32, steps=6, guidance=4.0)
WIDE = SampleSettings(width=64, height=32, steps=6, guidance=4.0)
LEFT, RIGHT = (0, 0, 32, 32), (0, 32, 32, 32)
P_LEFT, P_RIGHT = "a photo of a red star on a green background", "a photo of a blue circle on a yellow background"


@pytest.fixture(scope="module")
def backend():
    from dreambooth_core.backends.diffusers_loading import load_backend

    torch.set_num_threads(1)
    return load_backend("embedded")


def _random_network(backend, seed: int) -> LoRANetwork:
    torch.manual_seed(seed)
    network = LoRANetwork(backend.lora_targets(True, True, conv=True), rank=2)
    for adapter in network.adapters.values():
        torch.nn.init.normal_(adapter.lora_up.weight, std=0.05)
    return network


def _noise(backend, *seeds):
    return noise_for(list(seeds), backend.unet.config.in_channels, 32)


def test_one_region_without_adapters_is_the_pipelines_sample(backend):
    pipeline = backend.generate([P_LEFT], [3], SETTINGS)[0]
    mine = sample_regions(backend, [Region(P_LEFT, LEFT)], _noise(backend, 3), SETTINGS)
    assert np.abs(pipeline.astype(int) - mine).max() <= 1


def test_each_region_sees_only_its_own_adapters(backend):
    lora, zero = _random_network(backend, 0), LoRANetwork(backend.lora_targets(True, True, conv=True), rank=2)
    before = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    base = sample_regions(backend, [Region(P_LEFT, LEFT), Region(P_RIGHT, RIGHT)], _noise(backend, 1, 2), WIDE)
    right_only = sample_regions(backend, [Region(P_LEFT, LEFT), Region(P_RIGHT, RIGHT, (lora,))],
                                _noise(backend, 1, 2), WIDE)
    assert np.array_equal(right_only[:, :32], base[:, :32]), "the left region saw the right region's LoRA"
    assert np.abs(right_only[:, 32:].astype(int) - base[:, 32:]).mean() > 2, "the LoRA did not reach its region"
    zero_left = sample_regions(backend, [Region(P_LEFT, LEFT, (zero,)), Region(P_RIGHT, RIGHT, (lora, zero))],
                               _noise(backend, 1, 2), WIDE)
    assert np.array_equal(zero_left, right_only), "a zero LoRA changed its region, or stacking one changed the other"
    alone = sample_regions(backend, [Region(P_RIGHT, LEFT, (lora,))], _noise(backend, 2), SETTINGS)
    assert np.abs(alone.astype(int) - right_only[:, 32:]).max() <= 1, "a region is not what its prompt makes alone"
    after = backend.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the base weights were left patched"


@pytest.mark.parametrize("boxes, words", [
    ([LEFT], "1024 pixels uncovered"),
    ([LEFT, (0, 16, 32, 48)], "covered twice"),
    ([LEFT, (0, 32, 32, 40)], "not inside"),
])
def test_regions_must_partition_the_canvas(boxes, words):
    with pytest.raises(RegionError, match=words):
        region_masks([Region("x", b) for b in boxes], 32, 64)
    masks = region_masks([Region("x", LEFT), Region("y", RIGHT)], 32, 64)
    assert (np.sum(masks, axis=0) == 1).all()


def test_leakage_reads_the_other_subjects_colours():
    star, circle = multi.PAIRS[0]
    rng = __import__("random").Random(0)
    own = [tw.render(tw.random_view(rng, star.thing, "green")) for _ in range(4)]
    worn = [tw.render(tw.random_view(rng, tw.Thing("star", circle.thing.colour, "diagonal", circle.thing.colour2),
                                     "green")) for _ in range(4)]
    leaking = multi.only_colours(circle, star)
    assert sorted(leaking) == ["brown", "yellow"]
    assert max(multi.colour_share(im, leaking) for im in own) < 0.05
    assert min(multi.colour_share(im, leaking) for im in worn) > 0.8
    assert min(multi.colour_share(im, multi.only_colours(star, circle)) for im in own) > 0.8
    a, b = multi.backgrounds(multi.PAIRS[0], 0)
    assert a != b and not {a, b} & {"pink", "cyan", "brown", "yellow"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = multi.main(["--multi", "--output", str(out), "--pairs", "1", "--steps", "20", "--class-images", "2",
                           "--seeds", "1", "--sample-steps", "4", "--workers", "1"])
    return code, printed.getvalue(), out


def test_tiny_multi_eval_prints_the_table_and_the_ratios(tiny_run):
    code, printed, out = tiny_run
    assert code == 0
    lines = printed.strip().splitlines()
    assert lines[-1].startswith("leak_ratio=") and "fidelity_ratio=" in lines[-1] and "prompt_ratio=" in lines[-1]
    assert "joint_leak_ratio=" in lines[-1] and "not run" not in printed
    results = json.loads((out / "results.json").read_text())
    pair = results["pairs"][0]
    assert pair["pair"] == ["diagonal-star", "target-circle"]
    for method in multi.METHODS:
        assert len(pair[method]["fidelity"]) == 2 and 0 <= pair[method]["leakage"] <= 1
        assert 0 <= pair[method]["prompt"] <= 1
    # Regional composition gives each region exactly its own LoRA and noise: each half is that subject alone
    # (up to the decoder's rounding on a wider canvas); stacking gives each region both LoRAs.
    def numbers(method):
        return np.array(pair[method]["fidelity"] + [pair[method][k] for k in ("leakage", "cross", "prompt")])

    assert np.abs(numbers("regional") - numbers("alone")).max() < 0.02
    assert np.abs(numbers("stacking") - numbers("alone")).max() > 0.02, "stacking should change what regions draw"
    ratio = dict(kv.split("=") for kv in lines[-1].split())
    r, s = multi.mean_over_pairs(results, "regional"), multi.mean_over_pairs(results, "stacking")
    assert float(ratio["fidelity_ratio"]) == pytest.approx(r["fidelity"] / s["fidelity"], abs=0.006)
    from PIL import Image

    assert Image.open(out / "two_subjects.png").size[0] > 64 * 3
    assert (out / "loras" / "diagonal-star.safetensors").is_file()
    assert (out / "loras" / f"{multi.joint_name(multi.PAIRS[0])}.safetensors").is_file()


def test_the_joint_row_samples_one_lora_in_both_regions(tiny_run, backend):
    """The joint LoRA is sampled in both regions and scored like the others. Given the first subject's own
    LoRA as the "joint" one, the left half must be that subject alone, and the right half not."""
    _, _, out = tiny_run
    pair = multi.PAIRS[0]
    paths = [str(out / "loras" / f"{s.name}.safetensors") for s in pair]
    plan = multi.MultiPlan(pairs=(pair,), seeds=(0,), sample_steps=4)
    entry, rows = multi.evaluate_pair(backend, pair, paths, paths[0], plan, log=lambda *_: None)
    assert set(rows) == set(multi.METHODS) and rows["joint"][0].shape == (32, 64, 3)
    left = np.abs(rows["joint"][0][:, :32].astype(int) - rows["alone"][0][:, :32])
    right = np.abs(rows["joint"][0][:, 32:].astype(int) - rows["alone"][0][:, 32:])
    assert left.max() <= 1 and right.mean() > 2
    table = multi.format_tables({"pairs": [entry]})
    assert f"{entry['joint']['leakage']:9.3f}" in table


def test_the_joint_lora_is_one_run_of_both_subjects(tiny_run):
    """Both subjects as concepts of one run: its file adapts the same modules as a subject's own, and the
    run's own file names both subjects under their identifiers."""
    from safetensors import safe_open

    from dreambooth_core.adapters.metadata import read_subject

    _, _, out = tiny_run
    pair = multi.PAIRS[0]
    with safe_open(str(out / "loras" / f"{pair[0].name}.safetensors"), "pt") as f:
        own = set(f.keys())
    name = multi.joint_name(pair)
    with safe_open(str(out / "loras" / f"{name}.safetensors"), "pt") as f:
        joint = set(f.keys())
    assert joint == own
    with safe_open(str(out / "runs" / name / f"{name}.safetensors"), "pt") as f:
        phrases = read_subject(f.metadata()).phrases
    assert list(phrases) == [f"{t} {s.class_noun}" for s, t in zip(pair, multi.TOKENS)]


def test_the_cli_runs_eval_multi(capsys):
    from dreambooth_core.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--multi", "--help"])
    assert exit_.value.code == 0
    assert "python -m dreambooth_core eval --multi" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--multi" in capsys.readouterr().out
