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


def _grads(module_factory, x_shape, x_grad=True, dtype=torch.float32):
    torch.manual_seed(0)
    ref = module_factory().to(dtype)
    with torch.inference_mode():
        frozen = module_factory().to(dtype)
        frozen.load_state_dict(ref.state_dict())
    assert frozen.weight.is_inference()
    for p in ref.parameters():
        p.requires_grad_(False)
    ad_ref, ad = LoRAModule(ref, 2, 2.0), LoRAModule(frozen, 2, 2.0)
    nn.init.normal_(ad_ref.lora_up.weight)
    ad.load_state_dict(ad_ref.state_dict())
    ad_ref.attach(ref)  # the default path: the adapter wraps the forward, autograd saves the weight
    frozen.forward = FrozenForward(frozen, ad)
    x = torch.randn(x_shape, dtype=dtype)
    out = []
    for m, a in ((ref, ad_ref), (frozen, ad)):
        xi = x.clone().requires_grad_(x_grad)
        y = m(xi)
        y += 0.5  # hosts update outputs in place (Forge's transformer block: x += attn(x))
        (y ** 2).sum().backward()
        out.append((xi.grad, a.lora_down.weight.grad, a.lora_up.weight.grad))
    return out


def test_frozen_linear_and_conv_match_plain_autograd_on_inference_weights():
    # A Linear's and a 1×1 convolution's LoRA run fused with the frozen module (_FrozenLoRA), a 3×3's
    # as modules of their own; the frozen input (a text encoder's output) needs no dL/dx.
    for factory, shape, x_grad in ((lambda: HostLinear(6, 5), (3, 4, 6), True),
                                   (lambda: HostLinear(6, 5), (3, 4, 6), False),
                                   (lambda: nn.Conv2d(3, 4, 1), (2, 3, 5, 5), True),
                                   (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5), True)):
        (gx, gd, gu), (fx, fd, fu) = _grads(factory, shape, x_grad)
        assert (gx is None) == (fx is None) == (not x_grad)
        for a, b in ((gx, fx), (gd, fd), (gu, fu)):
            assert a is None or torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_a_bf16_host_with_its_fp32_lora_gets_the_gradients_of_plain_autograd():
    """A host running in bf16 (ComfyUI's bf16 training dtype): the LoRA stays fp32, its update and
    its share of dL/dx meet the host's bf16 tensors."""
    for factory, shape in ((lambda: HostLinear(6, 5), (3, 4, 6)), (lambda: nn.Conv2d(3, 4, 1), (2, 3, 5, 5))):
        (gx, gd, gu), (fx, fd, fu) = _grads(factory, shape, dtype=torch.bfloat16)
        assert fx.dtype == torch.bfloat16 and fd.dtype == fu.dtype == torch.float32
        for a, b in ((gx, fx), (gd, fd), (gu, fu)):
            assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2 * a.float().abs().max()), (a - b).abs().max()


def test_a_repeated_input_without_gradient_is_projected_once():
    """The cached caption embeddings reach cross-attention's key and value projections unchanged at
    every step: the frozen product is made once, an input with other values is projected again, and
    each call's output is its own tensor (the LoRA is added to it in place)."""
    calls = []

    class Counting(HostLinear):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    torch.manual_seed(0)
    with torch.inference_mode():
        frozen = Counting(6, 5)
    ad = LoRAModule(frozen, 2, 2.0)
    nn.init.normal_(ad.lora_up.weight)
    frozen.forward = FrozenForward(frozen, ad)
    context = torch.randn(2, 3, 6)
    first = frozen(context)
    first.sum().backward()
    again = frozen(context.clone())
    assert len(calls) == 1 and torch.equal(again, first)
    other = context + 1
    expected = nn.functional.linear(other, frozen.weight, frozen.bias) + ad.delta(other) * ad.scale
    assert torch.allclose(frozen(other), expected, atol=1e-6) and len(calls) == 2
    with torch.no_grad():  # sampling: the host's forward, nothing reused
        frozen(other)
    assert len(calls) == 3 and ad.lora_up.weight.grad is not None


def test_linear_like_modules_are_lora_targets():
    assert is_linear_like(nn.Linear(3, 2)) and is_linear_like(HostLinear(3, 2))
    assert not is_linear_like(nn.Conv2d(3, 2, 1)) and not is_linear_like(nn.LayerNorm(3))
    assert frozen_patchable(HostLinear(3, 2)) and frozen_patchable(nn.Conv2d(3, 2, 3, padding=1))
    assert not frozen_patchable(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"))
    assert LoRAModule(HostLinear(3, 2), 1, 1.0).lora_down.in_features == 3
