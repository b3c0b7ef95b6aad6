"""dreambooth_core.adapters.frozen: LoRA training through frozen modules whose weights are inference
tensors (Forge's and ComfyUI's loaders make them), with the gradients plain autograd would give."""
from __future__ import annotations

import torch
from torch import nn

from dreambooth_core.adapters.frozen import FrozenForward, frozen_patchable
from dreambooth_core.adapters.lora import LoRAModule, is_linear_like


class HostLinear(nn.Module):
    """A host's Linear that is no nn.Linear (as Forge's ForgeOperations.Linear)."""

    def __init__(self, i, o):
        super().__init__()
        self.in_features, self.out_features = i, o
        self.weight = nn.Parameter(torch.randn(o, i))
        self.bias = nn.Parameter(torch.randn(o))

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def _grads(module_factory, x_shape):
    torch.manual_seed(0)
    ref = module_factory()
    with torch.inference_mode():
        frozen = module_factory()
        frozen.load_state_dict(ref.state_dict())
    assert frozen.weight.is_inference()
    for p in ref.parameters():
        p.requires_grad_(False)
    ad_ref, ad = LoRAModule(ref, 2, 2.0), LoRAModule(frozen, 2, 2.0)
    nn.init.normal_(ad_ref.lora_up.weight)
    ad.load_state_dict(ad_ref.state_dict())
    ad_ref.attach(ref)  # the default path: the adapter wraps the forward, autograd saves the weight
    frozen.forward = FrozenForward(frozen, ad)
    x = torch.randn(x_shape)
    out = []
    for m, a in ((ref, ad_ref), (frozen, ad)):
        xi = x.clone().requires_grad_(True)
        (m(xi) ** 2).sum().backward()
        out.append((xi.grad, a.lora_down.weight.grad, a.lora_up.weight.grad))
    return out


def test_frozen_linear_and_conv_match_plain_autograd_on_inference_weights():
    for factory, shape in ((lambda: HostLinear(6, 5), (3, 4, 6)),
                           (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5))):
        (gx, gd, gu), (fx, fd, fu) = _grads(factory, shape)
        for a, b in ((gx, fx), (gd, fd), (gu, fu)):
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_linear_like_modules_are_lora_targets():
    assert is_linear_like(nn.Linear(3, 2)) and is_linear_like(HostLinear(3, 2))
    assert not is_linear_like(nn.Conv2d(3, 2, 1)) and not is_linear_like(nn.LayerNorm(3))
    assert frozen_patchable(HostLinear(3, 2)) and frozen_patchable(nn.Conv2d(3, 2, 3, padding=1))
    assert not frozen_patchable(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"))
    assert LoRAModule(HostLinear(3, 2), 1, 1.0).lora_down.in_features == 3
