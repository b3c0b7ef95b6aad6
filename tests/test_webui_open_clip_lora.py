"""LoRA on an OpenCLIP text encoder's fused attention (scripts/dreambooth_a1111/open_clip_lora.py), as A1111
holds SDXL's CLIP-G: training through the q/k/v slices computes the attention the host computes, the
adapters get gradients, and the file's q/k/v/out updates, applied to `in_proj_weight` and `out_proj` the way
A1111's Lora support applies them, give the output training saw."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from dreambooth_a1111.open_clip_lora import open_clip_lora_targets  # noqa: E402
from dreambooth_core.adapters.network import LoRANetwork  # noqa: E402

WIDTH, HEADS, LENGTH = 32, 4, 7


class Block(nn.Module):
    """open_clip's ResidualAttentionBlock, in the parts the text tower uses (sequence first)."""

    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(WIDTH, 4 * WIDTH))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, x, attn_mask):
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


def _encoder():
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(), Block()])
    mask = torch.full((LENGTH, LENGTH), float("-inf")).triu_(1)  # open_clip's causal mask

    def run(x):
        for b in blocks:
            x = b(x, mask)
        return x
    return blocks, run


def test_kohya_names_and_the_same_attention_before_training():
    blocks, run = _encoder()
    x = torch.randn(LENGTH, 2, WIDTH)
    with torch.no_grad():
        reference = run(x)
    weights = len(list(blocks.parameters()))
    targets, forwards = open_clip_lora_targets(blocks, "lora_te2")
    assert len(list(blocks.parameters())) == weights, "the q/k/v slices hold no weight of their own"
    assert len(targets) == 12 and "lora_te2_text_model_encoder_layers_1_self_attn_v_proj" in targets
    assert targets["lora_te2_text_model_encoder_layers_0_mlp_fc1"] is blocks[0].mlp.c_fc
    assert targets["lora_te2_text_model_encoder_layers_0_self_attn_out_proj"] is blocks[0].attn.out_proj
    for attention, forward in forwards:
        attention.forward = forward
    with torch.no_grad():
        assert torch.allclose(run(x), reference, atol=1e-5)


def test_trained_slices_equal_the_update_a1111_adds_to_in_proj_weight():
    blocks, run = _encoder()
    x = torch.randn(LENGTH, 2, WIDTH)
    targets, forwards = open_clip_lora_targets(blocks, "lora_te2")
    for attention, forward in forwards:
        attention.forward = forward
    network = LoRANetwork(targets, rank=4, alpha=4).attach()
    for adapter in network.adapters.values():  # as after training: up is no longer zero
        nn.init.normal_(adapter.lora_up.weight, std=0.05)
    out = run(x)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    trained = out.detach()

    # A1111's loader: q/k/v updates stacked into in_proj_weight, out into out_proj, the MLP Linears' own.
    fresh, run_fresh = _encoder()
    with torch.no_grad():
        for i, block in enumerate(fresh):
            delta = {rest: network.adapters[f"lora_te2_text_model_encoder_layers_{i}_{rest}"].weight_delta()
                     for rest in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                                  "mlp_fc1", "mlp_fc2")}
            block.attn.in_proj_weight += torch.cat([delta["self_attn_q_proj"], delta["self_attn_k_proj"],
                                                    delta["self_attn_v_proj"]])
            block.attn.out_proj.weight += delta["self_attn_out_proj"]
            block.mlp.c_fc.weight += delta["mlp_fc1"]
            block.mlp.c_proj.weight += delta["mlp_fc2"]
        applied = run_fresh(x)
    assert torch.allclose(applied, trained, atol=1e-4), (applied - trained).abs().max()
    with torch.no_grad():
        _, run_base = _encoder()
        assert (run_base(x) - trained).abs().max() > 1e-2, "the LoRA changed nothing"
