"""`fxllm::attention`: causal self-attention over a whole sequence (no KV cache).

Layout is token-major: q [B, T, Hq, D], k and v [B, T, Hkv, D], out [B, T, Hq, Dv].
GQA/MQA is implied by Hq being a multiple of Hkv. The reference computes scores in float32,
as Hugging Face eager attention does, and casts the probabilities back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxllm.ops.eager import eager_only
from fxllm.ops.registry import register_canonical_op


@eager_only
def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    sliding_window: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> Tensor:
    """Plain-torch causal attention; the semantics every backend must reproduce."""
    batch, q_len, num_heads, _ = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if sliding_window < 0 and softcap == 0.0 and sinks is None and q_len == kv_len:
        # The plain causal case is exactly SDPA; its fused CPU kernel is much faster than the math below.
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)
    group = num_heads // num_kv_heads
    kh = kh.repeat_interleave(group, dim=1)
    vh = vh.repeat_interleave(group, dim=1)
    scores = torch.matmul(qh.float(), kh.float().transpose(-1, -2)) * scale
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    # Query i sits at absolute position (kv_len - q_len + i): queries are the last q_len keys.
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
    k_pos = torch.arange(kv_len, device=q.device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window > 0:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink_col = sinks.float().reshape(1, num_heads, 1, 1).expand(batch, num_heads, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), vh)
    return out.transpose(1, 2)


@torch.library.custom_op("fxllm::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    sliding_window: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal attention, q [B,T,Hq,D], k/v [B,T,Hkv,D] -> [B,T,Hq,Dv]."""
    return attention_reference(q, k, v, scale, sliding_window, softcap, sinks).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, scale, sliding_window=-1, softcap=0.0, sinks=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# Opaque: inlining would trace one branch of the reference's shape test into the graph.
register_canonical_op("attention", attention_reference, inline=False)
