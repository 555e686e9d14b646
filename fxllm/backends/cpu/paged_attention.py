"""CPU paged attention: C++ kernels for the cache write and the decode step of `fxllm::paged_attention`.

The reference gathers every sequence's blocks into a padded float32 copy per layer and runs two
small matmuls; at batch 16 that copying was about half of a bfloat16 decode step. The decode
kernel reads keys and values straight from the paged cache, one (sequence, KV head) per task
across OpenMP threads, with float32 scores, softmax and accumulation. The write kernel replaces
the reference's masked index_copy (three nonzero calls per layer). Prefill and mixed steps attend
with the reference after the C++ write. Dtypes other than float32 and bfloat16, or a compiler
failure, fall back to the reference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fxllm.backends.cpu.kernels_cpp import DECODE_ARGS, WRITE_KV_ARGS, WRITE_KV_SOURCE, decode_source
from fxllm.ops.eager import eager_only
from fxllm.ops.paged_attention import attend_cached, paged_attention_reference

logger = logging.getLogger(__name__)

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_NO_SINKS = torch.zeros(1)


@functools.cache
def _kernels() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """Compile (or load from Inductor's on-disk cache) both kernels; None if the compiler fails."""
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        write = CppPythonBindingsCodeCache.load_pybinding(WRITE_KV_ARGS, WRITE_KV_SOURCE)
        decode = CppPythonBindingsCodeCache.load_pybinding(
            DECODE_ARGS,
            decode_source(
                avx512=torch.backends.cpu.get_cpu_capability() == "AVX512",
                avx512_bf16=torch.cpu._is_avx512_bf16_supported(),
            ),
        )
    except Exception:  # any build failure: the reference still gives the right answer
        logger.warning("CPU paged-attention kernels failed to build; using the reference", exc_info=True)
        return None
    return write, decode


def available() -> bool:
    """Whether the C++ kernels built on this machine."""
    return _kernels() is not None


def _inner_contiguous(t: Tensor) -> Tensor:
    """`t` [T, H, D] with rows that may be strided (a slice of a fused QKV) but contiguous heads."""
    if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]:
        return t
    return t.contiguous()


def _supported(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    code = _DTYPE_CODES.get(k_cache.dtype)
    return (
        code is not None
        and q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and q.device.type == "cpu"
    )


def _prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    head_dim_v: int,
    scale: float,
) -> Tensor:
    """Prefill/mixed step, plain causal attention. A sequence with no earlier context attends to this
    step's own k/v (no gather from the cache), and a run of such sequences of one length is one
    batched SDPA call over a view: 16 x 128-token prompts took 480 gather + SDPA calls before."""
    starts, lengths = query_start_loc.tolist(), seq_lens.tolist()
    num_seqs = len(lengths)
    out = q.new_empty((*q.shape[:-1], head_dim_v))
    s = 0
    while s < num_seqs:
        begin, q_len = starts[s], starts[s + 1] - starts[s]
        if q_len == 0 or q_len != lengths[s]:  # no query, or it continues a cached context
            if q_len:
                one = slice(s, s + 1)
                out[begin : starts[s + 1]] = attend_cached(
                    q[begin : starts[s + 1]], k_cache, v_cache, block_tables[one], seq_lens[one],
                    query_start_loc[one.start : s + 2] - begin, head_dim_v, scale, -1, 0.0, None,
                )  # fmt: skip
            s += 1
            continue
        run = 1  # following fresh sequences of the same length join this call
        while s + run < num_seqs and starts[s + run + 1] - starts[s + run] == q_len == lengths[s + run]:
            run += 1
        end = begin + run * q_len
        batch = [t[begin:end].unflatten(0, (run, q_len)).transpose(1, 2) for t in (q, k, v)]
        attended = torch.nn.functional.scaled_dot_product_attention(
            *batch, is_causal=True, scale=scale, enable_gqa=True
        )
        out[begin:end] = attended.transpose(1, 2).flatten(0, 1)
        s += run
    if starts[-1] < q.shape[0]:
        out[starts[-1] :] = 0  # padding tokens get a defined value, as in the reference
    return out


@eager_only
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
) -> Tensor:
    """Same contract as the reference (fxllm/ops/paged_attention.py), on CPU tensors."""
    kernels = _kernels()
    if kernels is None or not _supported(q, k, v, k_cache, v_cache):
        return paged_attention_reference(
            q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
            scale, sliding_window, softcap, sinks,
        )  # fmt: skip
    write, decode = kernels
    code = _DTYPE_CODES[k_cache.dtype]
    k, v = _inner_contiguous(k), _inner_contiguous(v)
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    slots = slots.contiguous()
    k_row, v_row = k.shape[1] * k.shape[2], v.shape[1] * v.shape[2]
    write(code, k, v, k_cache, v_cache, slots, slots.shape[0], k.stride(0), v.stride(0), k_row, v_row)
    num_seqs = seq_lens.shape[0]
    head_dim_v = v.shape[-1]
    if q.shape[0] != num_seqs:
        if sliding_window < 0 and softcap == 0.0 and sinks is None:
            return _prefill(
                q, k, v, k_cache, v_cache, block_tables, seq_lens, query_start_loc, head_dim_v, scale
            )
        return attend_cached(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, head_dim_v,
            scale, sliding_window, softcap, sinks,
        )  # fmt: skip
    q = _inner_contiguous(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = q.new_empty((q.shape[0], num_heads, head_dim_v))
    tables = block_tables if block_tables.dtype == torch.int32 else block_tables.int()
    tables = tables.contiguous()
    lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.int()
    lens = lens.contiguous()
    sink_values = _NO_SINKS if sinks is None else sinks.float().contiguous()
    decode(
        code, q, k_cache, v_cache, tables, lens, out, sink_values, int(sinks is not None),
        num_seqs, num_heads, k_cache.shape[2], head_dim, head_dim_v, k_cache.shape[1],
        q.stride(0), tables.stride(0), scale, sliding_window, softcap, torch.get_num_threads(),
    )  # fmt: skip
    return out
