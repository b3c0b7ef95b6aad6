"""FlowSchedule's `max_sigma`, and Cosmos Predict2's RFlow written as the core's flow schedule.

ComfyUI's COSMOS_RFLOW sampling (comfy/model_sampling.py, restated here: the core never imports a host) holds
a noisy latent as x0 + σ_e·ε at an EDM-style σ_e ∈ [sigma_min, sigma_max] = [0.002, 80]; its model reads
`calculate_input` = (x0 + σ_e·ε)·(1 − t) with t = σ_e/(1 + σ_e) (also its time input) and its output
becomes the image through `calculate_denoised` = input·(1 − t) − output·t. These tests show that this is
FlowSchedule's line at σ = t, the output its velocity target, and that `max_sigma` = 80/81 keeps the draws
where the host samples.
"""
from __future__ import annotations

import pytest
import torch

from dreambooth_core.training.schedules import SIGMA_MARGIN, FlowSchedule, schedule_settings

COSMOS_SIGMA_MAX = 80.0


def _cosmos_input(sigma_e, x):  # COSMOS_RFLOW.calculate_input
    t = (sigma_e / (sigma_e + 1)).view(-1, 1, 1, 1)
    return x * (1 - t)


def _cosmos_denoised(sigma_e, output, x):  # COSMOS_RFLOW.calculate_denoised
    t = (sigma_e / (sigma_e + 1)).view(-1, 1, 1, 1)
    return x * (1 - t) - output * t


def test_cosmos_rflow_is_the_flow_line_in_other_coordinates():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 4, 4, generator=gen), torch.randn(3, 16, 4, 4, generator=gen)
    sigma = torch.tensor([0.05, 0.5, 80 / 81])
    batch = FlowSchedule(max_sigma=80 / 81).noised(x0, noise, sigma)
    sigma_e = sigma / (1 - sigma)  # the host's σ whose `timestep` σ_e/(1 + σ_e) is σ
    host_x = x0 + sigma_e.view(-1, 1, 1, 1) * noise  # COSMOS_RFLOW.noise_scaling
    torch.testing.assert_close(_cosmos_input(sigma_e, host_x), batch.noisy)
    # the velocity target is the output that makes the host's denoised the image
    torch.testing.assert_close(_cosmos_denoised(sigma_e, batch.target, host_x), x0, rtol=1e-5, atol=1e-4)
    # the last point is sigma_max's
    assert float(sigma_e[-1]) == pytest.approx(COSMOS_SIGMA_MAX)


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform"])
def test_max_sigma_caps_the_draws_and_leaves_the_rest(sampling):
    top = COSMOS_SIGMA_MAX / (1 + COSMOS_SIGMA_MAX)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    free = FlowSchedule(sampling=sampling, logit_std=3.0).sample_timesteps(20000, gen())
    capped = FlowSchedule(sampling=sampling, logit_std=3.0, max_sigma=top).sample_timesteps(20000, gen())
    assert float(capped.max()) == pytest.approx(top) and bool((free > top).any())
    torch.testing.assert_close(capped, free.clamp(max=top))  # the same draws, the noisier ones taken at the cap
    assert bool((capped >= SIGMA_MARGIN).all())


def test_max_sigma_is_recorded_only_when_set_and_checked():
    # a run without it records what it recorded before the option existed (its checkpoints still resume)
    assert schedule_settings(FlowSchedule(shift=3.0)) == {"kind": "flow", "shift": 3.0, "sampling": "logit_normal",
                                                          "logit_mean": 0.0, "logit_std": 1.0}
    assert schedule_settings(FlowSchedule(max_sigma=0.5))["max_sigma"] == 0.5
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"max_sigma {bad}"):
            FlowSchedule(max_sigma=bad)
