"""What the A1111 backend refuses before any work, by name (scripts/dreambooth_a1111/backend.py): the WebUI's
models are fakes here with only the attributes A1111 1.10 sets (`is_sdxl`, `is_sdxl_inpaint`, `is_sd3`, the
SDXL conditioner's hijacked embedders with their `wrapped` encoder); the real SDXL base trains in
tests/a1111/test_webui_sdxl.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from dreambooth_a1111.backend import A1111Backend  # noqa: E402
from dreambooth_core.backends.base import UnsupportedModel  # noqa: E402


def _named(name: str) -> nn.Module:
    return type(name, (nn.Module,), {})()


class _Wrapper(nn.Module):
    """A1111's hijack wrapper around a generative-models embedder."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped


def _sdxl(embedders, **flags) -> nn.Module:
    m = nn.Module()
    m.is_sdxl, m.parameterization, m.alphas_cumprod = True, "eps", torch.linspace(0.99, 0.01, 1000)
    m.conditioner = nn.Module()
    m.conditioner.embedders = nn.ModuleList(embedders)
    m.cond_stage_model = m.conditioner  # as A1111's hijack sets it
    m.first_stage_model = nn.Module()
    m.model = nn.Module()
    m.model.diffusion_model = nn.Conv2d(4, 4, 1)
    for k, v in flags.items():
        setattr(m, k, v)
    return m


def BASE() -> list:
    """The SDXL base's embedders: CLIP-L, OpenCLIP-G (both hijacked), a size embedder."""
    return [_Wrapper(_named("FrozenCLIPEmbedder")), _Wrapper(_named("FrozenOpenCLIPEmbedder2")),
            _named("ConcatTimestepEmbedderND")]


def test_the_sdxl_base_is_taken_as_sdxl():
    backend = A1111Backend(_sdxl(BASE()))
    assert (backend.family, backend.native_resolution, backend.prediction_type) == ("sdxl", 1024, "epsilon")


@pytest.mark.parametrize("model, words", [
    (lambda: _sdxl([_Wrapper(_named("FrozenOpenCLIPEmbedder2")), _named("ConcatTimestepEmbedderND")]),
     ["refiner", "FrozenOpenCLIPEmbedder2", "load an SDXL base"]),
    (lambda: _sdxl(BASE(), is_sdxl_inpaint=True), ["SDXL inpainting", "load the base"]),
    (lambda: _sdxl(BASE(), is_sd3=True), ["SD1.x, SD2.x and SDXL"]),
])
def test_what_cannot_train_is_refused_by_name(model, words):
    with pytest.raises(UnsupportedModel) as err:
        A1111Backend(model())
    for word in words:
        assert word in str(err.value), str(err.value)


def test_a_full_fine_tune_of_sdxl_is_refused():
    with pytest.raises(ValueError, match="mode 'full'.*choose mode 'lora'"):
        A1111Backend(_sdxl(BASE()), mode="full")
