"""`fxllm::rotary_embedding`: rotate-half (NeoX style) RoPE applied to q and k together.

cos and sin are broadcastable against q and k over every dimension but the last (Hugging Face
passes them as [B, 1, T, D] against [B, H, T, D]). Partial rotary models apply the op to the
rotated slice only; the pass leaves the pass-through slice to the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxllm.ops.eager import eager_only
from fxllm.ops.registry import register_canonical_op


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@eager_only
def rotary_embedding_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Plain-torch RoPE in Hugging Face's order of operations."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@torch.library.custom_op("fxllm::rotary_embedding", mutates_args=())
def rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE on q and k with precomputed cos/sin; outputs are contiguous (the fake says so)."""
    q_out, k_out = rotary_embedding_reference(q, k, cos, sin)
    return q_out.contiguous(), k_out.contiguous()


@rotary_embedding.register_fake
def _rotary_embedding_fake(q, k, cos, sin):
    # Plain tensor arithmetic broadcasts like the reference; torch.broadcast_shapes would run a
    # Python generator, which torch.compile refuses to trace from inside a compiled graph.
    q_out, k_out = q * cos, k * cos
    return q_out.contiguous(), k_out.contiguous()


register_canonical_op("rotary_embedding", rotary_embedding_reference, inline=True)
