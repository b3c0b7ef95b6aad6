"""The optimizer option: Adafactor trains with a fraction of AdamW's state, 8-bit AdamW is refused with
what to install where bitsandbytes is missing, and a checkpoint resumes only with its own optimizer."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import make_tiny_backend
from dreambooth_core.training.checkpoint import CheckpointMismatch
from dreambooth_core.training.optimizers import OptimizerUnavailable, check_available, make_optimizer
from dreambooth_core.training.trainer import Callbacks, train
from test_trainer import CLASS, INSTANCE, config, lora_state


def _state_numbers(optimizer) -> int:
    return sum(t.numel() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))


def test_adafactor_keeps_a_fraction_of_adamw_s_state():
    """The memory lever it is for: AdamW keeps two full-size moments per weight, Adafactor a row and a
    column of the second moment (no first moment at beta1=None)."""
    sizes = {}
    for name in ("adamw", "adafactor"):
        weight = torch.nn.Parameter(torch.randn(64, 32))
        optimizer = make_optimizer(name, [{"params": [weight], "lr": 1e-3}], weight_decay=0.01)
        weight.grad = torch.randn_like(weight)
        optimizer.step()
        sizes[name] = _state_numbers(optimizer)
    assert sizes["adamw"] >= 2 * 64 * 32  # exp_avg and exp_avg_sq (and a step count)
    assert sizes["adafactor"] <= (64 + 32) + 8 < sizes["adamw"] / 20


def test_a_run_with_adafactor_trains_the_lora(tmp_path):
    result = train(make_tiny_backend(), config(tmp_path, optimizer="adafactor", steps=4), INSTANCE, CLASS)
    trained = lora_state(result)
    assert result.status == "completed" and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    ups = [v for k, v in trained.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().max() > 0 for v in ups), "lora_up starts at zero: Adafactor must have moved it"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_8_bit_adamw_without_bitsandbytes_is_refused_with_what_to_do():
    with pytest.raises(OptimizerUnavailable, match="bitsandbytes.*adafactor"):
        check_available("adamw8bit")


def test_a_checkpoint_resumes_only_with_its_own_optimizer(tmp_path):
    stop = Callbacks(should_stop=lambda: True)
    train(make_tiny_backend(), config(tmp_path, steps=3, optimizer="adafactor"), INSTANCE, CLASS, stop)
    with pytest.raises(CheckpointMismatch, match="optimizer: adafactor in the checkpoint, adamw now"):
        train(make_tiny_backend(), config(tmp_path, steps=3, resume=True), INSTANCE, CLASS)
    resumed = train(make_tiny_backend(), config(tmp_path, steps=3, resume=True, optimizer="adafactor"), INSTANCE, CLASS)
    assert resumed.status == "completed" and resumed.step == 3
