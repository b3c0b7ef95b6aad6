"""LoRA targets in an OpenCLIP text encoder (A1111's SDXL CLIP-G, as open_clip builds it), under kohya's names.

OpenCLIP's attention is a `torch.nn.MultiheadAttention`: q, k and v are one fused `in_proj_weight`, which
no Linear holds and whose forward (`F.multi_head_attention_forward`) reads the weights directly. kohya's
file (and A1111's Lora support, which adds the q/k/v updates to `in_proj_weight` and the out update to
`out_proj`) names them as the transformers layout does: `self_attn.{q,k,v,out}_proj`, `mlp.fc1|fc2`.
For training, each of q, k, v is a `InProjSlice` (a Linear over a view of the fused weight, so a core LoRA
attaches to it), and the attention's forward is replaced, for the run only, by the same attention computed
through those slices and `out_proj`'s own forward (so their LoRAs are in it).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dreambooth_core.adapters.kohya import TEXT_TARGETS, text_layer_name

#: transformers path in a CLIP layer -> open_clip path in a residual block (q/k/v: slices of attn)
OPEN_CLIP_PATHS = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


class InProjSlice(nn.Module):
    """q, k or v of a MultiheadAttention as a Linear (no weight of its own: a view of `in_proj_weight`)."""

    def __init__(self, attention: nn.MultiheadAttention, index: int):
        super().__init__()
        object.__setattr__(self, "attention", attention)  # not a child: its weights stay the attention's
        self.index = index
        self.in_features = self.out_features = attention.embed_dim

    def _rows(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t[self.index * self.out_features:(self.index + 1) * self.out_features]

    @property
    def weight(self) -> torch.Tensor:
        return self._rows(self.attention.in_proj_weight)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self._rows(self.attention.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SlicedAttention:
    """The forward of a self-attention MultiheadAttention, computed through its q/k/v slices and out_proj."""

    def __init__(self, attention: nn.MultiheadAttention, slices: List[InProjSlice]):
        self.attention, self.slices = attention, slices

    def __call__(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, **_ignored):
        a = self.attention
        key = query if key is None else key
        value = query if value is None else value
        q, k, v = (s(t) for s, t in zip(self.slices, (query, key, value)))

        def heads(t: torch.Tensor) -> torch.Tensor:  # (L, N, E) or (N, L, E) -> (N, h, L, E/h)
            t = t if a.batch_first else t.transpose(0, 1)
            n, length, e = t.shape
            return t.reshape(n, length, a.num_heads, e // a.num_heads).transpose(1, 2)

        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask)
        n, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(n, length, a.embed_dim)
        out = a.out_proj(out if a.batch_first else out.transpose(0, 1))
        return out, None


def open_clip_lora_targets(resblocks: nn.ModuleList, prefix: str
                           ) -> Tuple[Dict[str, nn.Module], List[Tuple[nn.Module, SlicedAttention]]]:
    """kohya name -> module for an OpenCLIP text transformer's blocks, and the (attention, forward) pairs
    to install for the run (the caller installs them and takes them off again)."""
    targets: Dict[str, nn.Module] = {}
    forwards: List[Tuple[nn.Module, SlicedAttention]] = []
    for i, block in enumerate(resblocks):
        attention = block.attn
        slices = [InProjSlice(attention, j) for j in range(3)]
        forwards.append((attention, SlicedAttention(attention, slices)))
        for rest in TEXT_TARGETS:
            module = slices[QKV[rest]] if rest in QKV else block.get_submodule(OPEN_CLIP_PATHS[rest])
            targets[text_layer_name(prefix, i, rest)] = module
    return targets, forwards
