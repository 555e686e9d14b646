"""`fxllm::paged_attention`: attention over a paged KV cache for a flat batch of sequences.

The flat batch holds every scheduled token of every sequence in one dimension: q [T, Hq, D],
k and v [T, Hkv, D]. Sequence s owns tokens query_start_loc[s]:query_start_loc[s+1]; after this
step it has seq_lens[s] tokens of context, the new ones last. The op first writes this step's k/v
into the caches at slot_mapping (slot = block * block_size + offset, -1 = padding, not written),
then attends each query to its sequence's cached keys, causally.

Caches are [num_blocks, block_size, Hkv, D]. The op writes them in place but declares no
mutation: nothing else in the graph reads a layer's cache, and declaring it would make the
compiler functionalise (copy) the whole pool every step. This is the same contract vLLM keeps by
hiding the cache from the graph.

An FP8 cache (float8_e4m3fn, `cache.dtype: fp8`) comes with float32 scales `k_scale` / `v_scale`
([1] or [Hkv], fxllm/ops/kv_quant.py): writing stores k / k_scale (clamped to +-448), reading
multiplies back; the attention then runs in q's dtype as for any other cache.

`fxllm::paged_attention_rope` is the same op with rotate-half RoPE applied to q and k first (cos/sin [T, D]),
so a backend can rotate in the attention kernels (fxllm/passes/fuse_rope_attention.py folds the rotary node in).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxllm.ops.eager import eager_only
from fxllm.ops.kv_quant import dequantize_kv, is_fp8, quantize_kv
from fxllm.ops.registry import register_canonical_op


def _to_cache(x: Tensor, cache: Tensor, scale: Tensor | None, name: str) -> Tensor:
    if not is_fp8(cache.dtype):
        return x.to(cache.dtype)
    if scale is None:
        raise ValueError(
            f"an FP8 KV cache is written without {name}: the cache pass must pass the layer's scales"
        )
    return quantize_kv(x, scale, cache.dtype)


def write_kv_cache(
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    """Scatter this step's keys/values into the paged caches (slots < 0 are skipped; FP8 caches quantize)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    k_rows = _to_cache(k[valid], k_cache, k_scale, "k_scale")
    v_rows = _to_cache(v[valid], v_cache, v_scale, "v_scale")
    if is_fp8(k_cache.dtype):  # index_copy_ has no float8 kernel on the CPU: copy the bytes
        k_flat, v_flat, k_rows, v_rows = (t.view(torch.uint8) for t in (k_flat, v_flat, k_rows, v_rows))
    k_flat.index_copy_(0, slots, k_rows)
    v_flat.index_copy_(0, slots, v_rows)


def _gather_context(cache: Tensor, block_table: Tensor, length: int) -> Tensor:
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache.index_select(0, block_table[:num_blocks].long()).flatten(0, 1)[:length]


def _attend(
    q: Tensor, k: Tensor, v: Tensor, scale: float, sliding_window: int, softcap: float, sinks: Tensor | None
) -> Tensor:
    """Queries are the last q.shape[0] positions of k/v's context; q [Lq,H,D], k/v [L,Hkv,D]."""
    from fxllm.ops.attention import attention_reference

    return attention_reference(q[None], k[None], v[None], scale, sliding_window, softcap, sinks)[0]


def _decode_batch(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int,
    softcap: float,
    sinks: Tensor | None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """One query per sequence: gather every context (padded to the longest) and attend at once.

    index_select gathers blocks ~6x faster than advanced indexing on the CPU, and two batched
    float32 matmuls beat SDPA's fused kernel here (one query row; SDPA is 2-3x slower, bf16 worst).
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = int(seq_lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks].reshape(-1).long()
    padded = num_blocks * block_size
    keys = k_cache.index_select(0, table).view(num_seqs, padded, num_kv_heads, -1)
    values = v_cache.index_select(0, table).view(num_seqs, padded, num_kv_heads, -1)
    if is_fp8(k_cache.dtype):  # dequantized values rounded to q's dtype, as the other paths compute
        keys, values = dequantize_kv(keys, k_scale, q.dtype), dequantize_kv(values, v_scale, q.dtype)
    group = num_heads // num_kv_heads
    qg = q.view(num_seqs, num_kv_heads, group, head_dim).float()
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1).float()) * scale  # [S, Hkv, G, L]
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(padded, device=q.device)[None, :]
    lens = seq_lens.long()[:, None]
    allowed = pos < lens
    if sliding_window > 0:
        allowed = allowed & (lens - 1 - pos < sliding_window)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, num_kv_heads, group, 1).expand(num_seqs, -1, -1, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3).float())  # [S, Hkv, G, Dv]
    return out.reshape(num_seqs, num_heads, -1).to(q.dtype)


@eager_only
def paged_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    sliding_window: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Plain-torch paged attention; the semantics every backend must reproduce."""
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return attend_cached(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, v.shape[-1],
        scale, sliding_window, softcap, sinks, k_scale, v_scale,
    )  # fmt: skip


def attend_cached(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    head_dim_v: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    sinks: Tensor | None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """The attention half of the op, after this step's k/v are in the caches (backends reuse it)."""
    num_seqs = seq_lens.shape[0]
    if q.shape[0] == num_seqs:  # every sequence contributes exactly one query: a pure decode step
        return _decode_batch(
            q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap, sinks, k_scale, v_scale,
        )  # fmt: skip
    fp8 = is_fp8(k_cache.dtype)
    out = q.new_empty((*q.shape[:-1], head_dim_v))
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    for s in range(num_seqs):
        begin, end = starts[s], starts[s + 1]
        if end == begin:
            continue
        keys = _gather_context(k_cache, block_tables[s], lengths[s])
        values = _gather_context(v_cache, block_tables[s], lengths[s])
        if fp8:
            keys, values = dequantize_kv(keys, k_scale, q.dtype), dequantize_kv(values, v_scale, q.dtype)
        out[begin:end] = _attend(q[begin:end], keys, values, scale, sliding_window, softcap, sinks)
    if starts[-1] < q.shape[0]:
        out[starts[-1] :] = 0  # padding tokens (CUDA-graph buckets) get a defined value
    return out


@torch.library.custom_op("fxllm::paged_attention", mutates_args=())
def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    sliding_window: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Write k/v into the paged caches, then causal attention per sequence; q [T,Hq,D] -> [T,Hq,Dv]."""
    return paged_attention_reference(
        q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
        scale, sliding_window, softcap, sinks, k_scale, v_scale,
    )  # fmt: skip


@paged_attention.register_fake
def _paged_attention_fake(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
                          scale, sliding_window=-1, softcap=0.0, sinks=None, k_scale=None, v_scale=None):  # fmt: skip
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# Opaque: the reference loops over sequences on host values and writes the caches in place.
register_canonical_op("paged_attention", paged_attention_reference, inline=False)


@eager_only
def paged_attention_rope_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    cos: Tensor,
    sin: Tensor,
    scale: float,
    sliding_window: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """`fxllm::rotary_embedding` on q and k (cos/sin [T, D], one row per token), then paged attention."""
    from fxllm.ops.rotary import rotary_embedding_reference

    q_rot, k_rot = rotary_embedding_reference(q, k, cos[:, None, :], sin[:, None, :])
    return paged_attention_reference(
        q_rot, k_rot, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
        scale, sliding_window, softcap, sinks, k_scale, v_scale,
    )  # fmt: skip


@torch.library.custom_op("fxllm::paged_attention_rope", mutates_args=())
def paged_attention_rope(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    cos: Tensor,
    sin: Tensor,
    scale: float,
    sliding_window: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Rotate-half RoPE on q [T,Hq,D] and k [T,Hkv,D] with cos/sin [T, D], then `fxllm::paged_attention`."""
    return paged_attention_rope_reference(
        q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc, cos, sin,
        scale, sliding_window, softcap, sinks, k_scale, v_scale,
    )  # fmt: skip


@paged_attention_rope.register_fake
def _paged_attention_rope_fake(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
                               cos, sin, scale, sliding_window=-1, softcap=0.0, sinks=None, k_scale=None,
                               v_scale=None):  # fmt: skip
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# Opaque like paged_attention (it writes the caches in place); fxllm/passes/fuse_rope_attention.py emits it.
register_canonical_op("paged_attention_rope", paged_attention_rope_reference, inline=False)
