"""What runs differently on an accelerator, checked without one: the devices and dtypes the
trainer and the diffusers backend put tensors on (a CUDA-only mistake fails here too)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_backend
from dreambooth_core.config import TrainConfig
from dreambooth_core.trainer import DreamBoothTrainer, _Bucket, step_generator
from test_trainer import CLASS, INSTANCE


def _bucket(n: int, device: str, flip: bool, masks: bool = False) -> _Bucket:
    gen = torch.Generator().manual_seed(n)
    latents = torch.randn(n, 4, 8, 8, generator=gen)
    mask = torch.rand(n, 1, 8, 8, generator=gen)
    return _Bucket(latents.to(device), latents.flip(-1).to(device) if flip else None,
                   [f"caption {i}" for i in range(n)], (16, 16), mask.to(device) if masks else None)


@pytest.mark.parametrize("masks", [False, True])
def test_the_draw_keeps_latents_on_their_device(tmp_path, masks):
    """The diffusers and WebUI backends cache latents on their device (CUDA): the flip choice, drawn
    on the CPU generator, must follow them there. `meta` stands for CUDA: like it, it refuses a CPU
    condition against its tensors. On the CPU the draw is what it always was."""
    config = TrainConfig(class_noun="star", output_dir=str(tmp_path), batch_size=2, flip=True,
                         mask_background_weight=0.25)
    trainer = DreamBoothTrainer(make_tiny_backend(), config, INSTANCE, CLASS)
    parts, weight = trainer._draw(3, 0, [_bucket(3, "meta", True, masks)], [_bucket(4, "meta", False)])
    assert [p[0].device.type for p in parts] == ["meta", "meta"]
    assert (weight is not None) == masks and (weight is None or weight.device.type == "meta")

    inst = _bucket(3, "cpu", True, masks)
    lat = trainer._draw(3, 0, [inst], [_bucket(4, "cpu", False)])[0][0][0]
    g = step_generator(0, 3, 0)
    torch.multinomial(torch.tensor([3.0]), 1, generator=g)
    idx = torch.randint(3, (2,), generator=g)
    flips = torch.randint(2, (2,), generator=g).bool().view(-1, 1, 1, 1)
    assert torch.equal(lat, torch.where(flips, inst.flipped[idx], inst.latents[idx]))
