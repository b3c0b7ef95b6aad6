"""bench/memory: the estimator predicts what the step it models really allocates, and each memory
lever moves the part of the peak it should."""
from __future__ import annotations

import dataclasses
import runpy
import sys

import pytest
import torch

from bench.memory import architectures, estimate, measure, settings
from bench.memory.settings import Setting
from bench.memory.tracker import StorageTracker


def _small(key: str, resolution: int = 64) -> architectures.Spec:
    return dataclasses.replace(architectures.reduced_specs()[key], resolution=resolution)


def test_tracker_counts_each_storage_once_and_forgets_freed_ones():
    tracker = StorageTracker()
    with tracker:
        a = torch.zeros(1024)  # 4 KiB
        view = a[:10]  # same storage: not counted again
        b = torch.ones(2048)  # 8 KiB: the peak holds a and b
        del b
        c = a + 1  # 4 KiB more, after b was freed
    assert tracker.peak == 4096 + 8192
    assert tracker.current["act"] == 4096 + 4096
    assert view.untyped_storage().nbytes() == 4096 and c.numel() == 1024


def test_tracker_refuses_an_unknown_part():
    with pytest.raises(ValueError, match="part 'gpu'"):
        StorageTracker().tag([torch.zeros(1)], "gpu")


_PREDICTIONS = {}

SETTINGS = {
    "fp32": Setting("fp32", "fp32", base="fp32", checkpointing="full"),
    "bf16-kept": Setting("bf16-kept", "bf16, encoders kept", checkpointing="full", encoders_on_gpu=True),
    "off": Setting("off", "bf16, no checkpointing"),
    "full": Setting("full", "bf16, checkpointing", checkpointing="full"),
    "adafactor": Setting("adafactor", "bf16, checkpointing, Adafactor", checkpointing="full", optimizer="adafactor"),
    "fp8": Setting("fp8", "fp8, checkpointing", base="fp8", checkpointing="full"),
    "fp8-separate": Setting("fp8-separate", "fp8, checkpointing, prior apart", base="fp8", checkpointing="full",
                            prior_pass="separate"),
}


def _predict(key: str, setting: str, cuda_norms: bool = True) -> estimate.Breakdown:
    """Predictions are shared between tests (each one runs two fake steps)."""
    if (key, setting, cuda_norms) not in _PREDICTIONS:
        _PREDICTIONS[key, setting, cuda_norms] = estimate.predict(_small(key), SETTINGS[setting], cuda_norms=cuda_norms)
    return _PREDICTIONS[key, setting, cuda_norms]


@pytest.mark.parametrize("key,setting", [("flux", "fp8"), ("flux", "fp8-separate"), ("sd15", "fp32")])
def test_prediction_is_within_15_percent_of_the_measured_cpu_peak(key, setting):
    predicted = _predict(key, setting, cuda_norms=False).peak
    measured = measure.measured_peak(_small(key), SETTINGS[setting])
    assert 0.85 <= measured / predicted <= 1.15, (measured, predicted)


def test_gradient_checkpointing_lowers_the_predicted_activations():
    off, full = _predict("flux", "off"), _predict("flux", "full")
    assert full.activations < 0.8 * off.activations
    assert full.weights == off.weights


def test_a_separate_prior_pass_lowers_the_predicted_activations():
    joint, apart = _predict("flux", "fp8"), _predict("flux", "fp8-separate")
    assert apart.activations < 0.8 * joint.activations and apart.peak < joint.peak
    # the instance part's LoRA gradients are held while the class part runs: counted with the LoRA
    assert apart.weights == joint.weights and apart.lora_optim >= joint.lora_optim


def test_adafactor_keeps_less_optimizer_state_than_adamw():
    adamw, adafactor = _predict("flux", "full"), _predict("flux", "adafactor")
    # LoRA weights and gradients are the same; AdamW adds 2 values per weight, Adafactor ~ n + m per n×m matrix.
    assert adafactor.lora_optim < 0.75 * adamw.lora_optim
    assert adafactor.weights == adamw.weights


def test_a_half_precision_base_halves_the_weights_and_fp8_halves_them_again():
    fp32, bf16_kept = _predict("sd15", "fp32"), _predict("sd15", "bf16-kept")
    backend = architectures.build(_small("sd15"), torch.bfloat16, meta=True)
    encoders = sum(t.numel() * t.element_size() for m in architectures.modules_of(backend)[1]
                   for t in list(m.parameters()) + list(m.buffers()))
    assert (bf16_kept.weights - encoders) / fp32.weights == pytest.approx(0.5, abs=0.01)
    bf16, fp8 = _predict("flux", "full"), _predict("flux", "fp8")
    assert fp8.weights / bf16.weights == pytest.approx(0.5, abs=0.02)


def test_released_encoders_are_not_counted():
    backend = architectures.build(_small("sd15"), torch.float32, meta=True)
    unet = sum(t.numel() * t.element_size() for t in list(backend.unet.parameters()) + list(backend.unet.buffers()))
    assert _predict("sd15", "fp32").weights == unet


def test_full_size_sd15_weights_are_the_real_unet_in_bf16():
    spec = architectures.real_specs()["sd15"]
    result = estimate.predict(spec, Setting("bf16", "bf16", checkpointing="full"), steps=1)
    assert result.weights == pytest.approx(859_520_964 * 2, rel=1e-3)  # SD1.5's UNet: 859.5 M parameters
    assert 0.1 * 2**30 < result.activations < 2 * 2**30


def test_every_lever_says_how_a_user_turns_it_on():
    rows = settings.flux_settings() + settings.sd_settings()
    assert all(s.option and "not an option" not in s.option for s in rows)
    flux = {s.key: s for s in settings.flux_settings()}
    assert "checkpointing off" in flux["bf16-nogc"].option and "fp8" in flux["fp8"].option


def test_bench_dispatches_memory_and_leaves_other_arguments_to_the_benchmark(monkeypatch):
    import bench.memory.cli
    import bench.run

    calls = []
    monkeypatch.setattr(bench.run, "main", lambda: calls.append(("run", list(sys.argv))) or 0)
    monkeypatch.setattr(bench.memory.cli, "main", lambda argv: calls.append(("memory", argv)) or 0)
    for argv in (["bench", "--quick", "--models", "sd15"], ["bench", "memory", "--quick"]):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit):
            runpy.run_module("bench", run_name="__main__")
    assert calls == [("run", ["bench", "--quick", "--models", "sd15"]), ("memory", ["--quick"])]


def test_unknown_family_is_named():
    from bench.memory.cli import parse

    with pytest.raises(SystemExit):
        parse(["--families", "sd15,sd9"])
