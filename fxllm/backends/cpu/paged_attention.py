"""CPU paged attention: C++ kernels for the cache write and the attention of `fxllm::paged_attention`.

The reference gathers every sequence's blocks into a padded float32 copy per layer and runs two
small matmuls; at batch 16 that copying was about half of a bfloat16 decode step. The attention
kernel reads keys and values straight from the paged cache, one (query row, KV head) per task
across OpenMP threads, with float32 scores, softmax and accumulation; each query row sees its
sequence's keys up to its own position, so decode, prefill, chunked prefill and mixed steps are one
call (16 x 128-token prompts, bf16: the prefill step 720 ms with per-sequence SDPA -> 622 ms). The
write kernel replaces the reference's masked index_copy (three nonzero calls per layer). Dtypes
other than float32 and bfloat16, or a compiler failure, fall back to the reference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fxllm.backends.cpu.isa import DTYPE_CODES, has_avx512, has_avx512_bf16
from fxllm.backends.cpu.kernels_cpp import DECODE_ARGS, WRITE_KV_ARGS, WRITE_KV_SOURCE, decode_source
from fxllm.ops.eager import eager_only
from fxllm.ops.paged_attention import paged_attention_reference

logger = logging.getLogger(__name__)

_NO_SINKS = torch.zeros(1)


@functools.cache
def _kernels() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """Compile (or load from Inductor's on-disk cache) both kernels; None if the compiler fails."""
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        write = CppPythonBindingsCodeCache.load_pybinding(WRITE_KV_ARGS, WRITE_KV_SOURCE)
        decode = CppPythonBindingsCodeCache.load_pybinding(
            DECODE_ARGS,
            decode_source(avx512=has_avx512(), avx512_bf16=has_avx512_bf16()),
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
    code = DTYPE_CODES.get(k_cache.dtype)
    return (
        code is not None
        and q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and q.device.type == "cpu"
    )


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
    write, attend = kernels
    code = DTYPE_CODES[k_cache.dtype]
    k, v = _inner_contiguous(k), _inner_contiguous(v)
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    slots = slots.contiguous()
    k_row, v_row = k.shape[1] * k.shape[2], v.shape[1] * v.shape[2]
    write(code, k, v, k_cache, v_cache, slots, slots.shape[0], k.stride(0), v.stride(0), k_row, v_row)
    head_dim_v = v.shape[-1]
    q = _inner_contiguous(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = q.new_empty((q.shape[0], num_heads, head_dim_v))
    tables = block_tables if block_tables.dtype == torch.int32 else block_tables.int()
    tables = tables.contiguous()
    lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.int()
    lens = lens.contiguous()
    starts = query_start_loc if query_start_loc.dtype == torch.int32 else query_start_loc.int()
    starts = starts.contiguous()
    sink_values = _NO_SINKS if sinks is None else sinks.float().contiguous()
    attend(
        code, q, k_cache, v_cache, tables, lens, starts, out, sink_values, int(sinks is not None),
        seq_lens.shape[0], q.shape[0], num_heads, k_cache.shape[2], head_dim, head_dim_v, k_cache.shape[1],
        q.stride(0), tables.stride(0), scale, sliding_window, softcap, torch.get_num_threads(),
    )  # fmt: skip
    return out
