"""A LoRA under autocast shares its saved input with the frozen layer it adapts (dreambooth_core.adapters.lora)."""
from __future__ import annotations

import torch
from torch import nn

from dreambooth_core.adapters.lora import LoRAModule


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `fn` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_three_adapters_on_one_bf16_input_keep_no_copies_of_it():
    torch.manual_seed(0)
    bases = [nn.Linear(256, 256) for _ in range(3)]  # q, k, v on the same hidden states
    adapters = [LoRAModule(b, rank=4, alpha=4.0) for b in bases]
    x = torch.randn(64, 256, requires_grad=True)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = x * 1.0  # the block's hidden states in bf16, as the previous layer leaves them
            h = h.to(torch.bfloat16)
            outs = [b(h) + a.delta(h) * a.scale for b, a in zip(bases, adapters)]
        return sum(o.float().sum() for o in outs)

    saved = _saved_bytes(run)
    copy = 64 * 256 * 2  # one bf16 copy of the input
    weights = sum(b.weight.numel() * 2 for b in bases) + sum(p.numel() * 2 for a in adapters for p in a.parameters())
    # The weights' bf16 casts, x (at most twice: as given and as the bf16 h), the rank-4 intermediates;
    # before the fix each adapter added its own copy of h on top.
    assert saved <= weights + 2 * copy + 3 * 64 * 4 * 2, saved
    loss = run()
    loss.backward()
    assert all(a.lora_down.weight.grad is not None for a in adapters)


def test_outside_autocast_a_bf16_input_still_meets_fp32_adapters():
    base = nn.Linear(32, 16)
    a = LoRAModule(base, rank=2, alpha=2.0)
    y = a.delta(torch.randn(4, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.float32 and y.shape == (4, 16)
