"""reForge (Panchovix/stable-diffusion-webui-reForge, main 2026-03) differs from A1111 1.10 at three calls the
A1111 backend makes (issue 40). reForge itself does not run here, so each call is a small fake with
reForge's behaviour, read from its source (cited per test), beside A1111's:

- `networks.load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None)` zips the
  multipliers (extensions-builtin/Lora/networks.py:86): `load_networks([])` raises TypeError;
- `modules.sd_hijack` has no module-level `undo_optimizations` / `apply_optimizations` (commented out,
  modules/sd_hijack.py:59-65);
- `sd_model.encode_first_stage` returns the latent already scaled (`latent_format.process_in`), under
  `torch.inference_mode` (modules_forge/forge_loader.py:540-545), not a posterior.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from dreambooth_a1111.backend import A1111Backend, clear_active_loras  # noqa: E402

SCALE = 0.18215


class _ReForgeNetworks(types.ModuleType):
    """reForge's load_networks: the multipliers are zipped whatever the names."""

    def __init__(self):
        super().__init__("networks")
        self.loaded = ["last prompt's LoRA"]
        self.calls = []

    def load_networks(self, names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
        self.loaded.clear()
        targets = [[a, b, c] for a, b, c in zip(names, unet_multipliers, te_multipliers)]  # TypeError on None
        self.calls.append((list(names), targets))


class _A1111Networks(_ReForgeNetworks):
    """A1111 1.10's: the multipliers indexed only when given."""

    def load_networks(self, names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
        self.loaded.clear()
        self.calls.append((list(names), [te_multipliers[i] if te_multipliers else 1.0 for i in range(len(names))]))


@pytest.mark.parametrize("host", [_ReForgeNetworks, _A1111Networks])
def test_the_last_prompts_loras_are_released_on_either_signature(monkeypatch, host):
    networks = host()
    with pytest.raises(TypeError):  # the call the backend made before: reForge's fault
        _ReForgeNetworks().load_networks([])
    monkeypatch.setitem(sys.modules, "networks", networks)
    clear_active_loras()
    assert networks.loaded == [] and networks.calls == [([], [])]


def _fake_sd_hijack(monkeypatch, **functions) -> types.ModuleType:
    hijack = types.ModuleType("modules.sd_hijack")
    hijack.__dict__.update(functions)
    package = types.ModuleType("modules")
    package.sd_hijack = hijack
    monkeypatch.setitem(sys.modules, "modules", package)
    monkeypatch.setitem(sys.modules, "modules.sd_hijack", hijack)
    monkeypatch.setitem(sys.modules, "networks", _A1111Networks())
    return hijack


class _Model(nn.Module):
    """The attributes of the WebUI's ldm SD1 model that A1111Backend reads, with `encode` as its
    encode_first_stage."""

    def __init__(self, encode):
        super().__init__()
        self.cond_stage_model = nn.Identity()
        self.parameterization = "eps"
        self.alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
        self.first_stage_model = nn.Module()
        self.first_stage_model.encoder = nn.Conv2d(3, 8, 1)
        self.first_stage_model.encoder.num_resolutions = 4
        self.model = nn.Module()
        self.model.diffusion_model = nn.Conv2d(4, 4, 1)
        self.scale_factor = SCALE
        self.encode_first_stage = encode


def _backend(encode) -> A1111Backend:
    return A1111Backend(_Model(encode))


def test_a_webui_without_the_attention_switches_trains_without_them(monkeypatch):
    _fake_sd_hijack(monkeypatch)  # reForge: no undo_optimizations / apply_optimizations
    backend = _backend(lambda x: x)
    backend.begin_job(optimized=False)
    backend.end_job(optimized=False)


def test_a1111s_attention_switches_are_turned_off_and_on_around_the_job(monkeypatch):
    calls = []
    _fake_sd_hijack(monkeypatch, undo_optimizations=lambda: calls.append("undo"),
                    apply_optimizations=lambda: calls.append("apply"))
    backend = _backend(lambda x: x)
    backend.begin_job(optimized=False)
    assert calls == ["undo"]
    backend.end_job(optimized=False)
    assert calls == ["undo", "apply"]
    backend.begin_job(optimized=True)  # the user's option keeps them on
    backend.end_job(optimized=True)
    assert calls == ["undo", "apply"]


def _latent(x: torch.Tensor) -> torch.Tensor:
    return x[:, :2].repeat(1, 2, 1, 1)[:, :, ::8, ::8]


def test_a_latent_the_host_scaled_already_is_not_scaled_again_and_trains():
    @torch.inference_mode()
    def reforge_encode(x):  # vae.encode then latent_format.process_in, in inference mode
        return _latent(x) * SCALE

    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    z = _backend(reforge_encode).encode_images(pixels)
    assert torch.allclose(z, _latent(pixels) * SCALE), "scaled twice (or not at all)"
    assert not z.is_inference()
    w = torch.ones(1, requires_grad=True)
    (z * w).square().sum().backward()  # an inference tensor saved for backward would raise here
    assert w.grad is not None


def test_a1111s_posterior_gives_its_mode_times_the_scale_factor():
    class Posterior:
        def __init__(self, mean):
            self.mean = mean

        def mode(self):
            return self.mean

        def sample(self):
            return self.mean + torch.randn_like(self.mean)

    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    z = _backend(lambda x: Posterior(_latent(x))).encode_images(pixels)
    assert torch.allclose(z, _latent(pixels) * SCALE)
