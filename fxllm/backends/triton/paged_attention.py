"""Triton paged attention: drop-in CUDA implementation of `fxllm::paged_attention` and
`fxllm::paged_attention_rope`; this module picks the path and launches the kernels.

Three launches, none of which reads a value back to the host (the op runs inside CUDA graphs):
1. `_write_kv_kernel` (paged_attention_common.py), grid (T,): scatter this step's k/v rows into the caches at
   slot_mapping (-1 skipped); in the prefill path it also zeroes the output rows of padding tokens
   (t >= query_start_loc[-1]), which belong to no sequence.
2. Decode (T == S, one query per sequence, a shape fact): `_decode_kernel` + `_combine_kernel`
   (paged_attention_decode.py), split-KV then a merge of the splits.
   Prefill / chunked prefill / mixed: `_prefill_kernel` (paged_attention_prefill.py), flash-style over the
   paged keys, causal w.r.t. absolute positions.
K/V tiles of BLOCK_N tokens are gathered through the block table: one entry per page where the block size is a
power of two dividing BLOCK_N (`PAGE_ROWS`), else one per token (any block size works).
Scores and softmax are float32 (exp2, log2(e) = 1.4426950408889634 folded into the scale); P is rounded to the cache
dtype before P @ V, as the reference rounds its probabilities to v's dtype.
Step-varying arguments (sequences, KV splits) are `do_not_specialize`: Triton would otherwise compile variants
for the value 1 and for multiples of 16, i.e. again while the decode buckets are captured.
FP8 caches (float8_e4m3fn, KV_FP8): the write kernel stores k / k_scale clamped to +-448; the attention kernels
convert the e4m3 tiles to q's dtype (exact: every e4m3 value is a bf16 value), fold k_scale into the score scale
and multiply the output by v_scale. Scales are device tensors ([1] or [Hkv], stride 0 or 1), read in-kernel.
RoPE (`paged_attention_rope`, cos/sin [T, D]): the write kernel rotates k before storing it and q is rotated
in-kernel (below), so the standalone RoPE kernel and its q/k round trip through memory go away.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch
import triton
from torch import Tensor

from fxllm.backends.triton import (
    paged_attention_common,
    paged_attention_decode,
    paged_attention_decode_loops,
    paged_attention_prefill,
)
from fxllm.ops.kv_quant import FP8_KV_DTYPE, is_fp8

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(paged_attention_decode._decode_kernel, InterpretedFunction):
        # The tests switch the interpreter on after another module imported these kernels as GPU kernels and
        # then reload this module: reload the kernel modules with it (common first, the others import from it).
        _modules = (paged_attention_common, paged_attention_decode_loops, paged_attention_decode,
                    paged_attention_prefill)  # fmt: skip
        for _module in _modules:
            importlib.reload(_module)

# Imported after the reload above; tests and benchmarks reach the kernels through this module too.
from fxllm.backends.triton.paged_attention_common import _write_kv_kernel
from fxllm.backends.triton.paged_attention_decode import _combine_kernel, _decode_kernel
from fxllm.backends.triton.paged_attention_decode_choice import choose_decode_loop
from fxllm.backends.triton.paged_attention_prefill import _prefill_kernel, prefill_launch

logger = logging.getLogger(__name__)


_MAX_SPLITS = 64
# The prefill kernel's key tiles as whole cache pages where `_page_rows` allows (`page_tiles`), as the decode
# loops' always are. H200, 8B heads, 4 x 2,048 with RoPE (gpu_prefill_mix.py): 549.5 -> 479.9 us, same launch.
PREFILL_PAGE_TILES = True
# Launch variants, each an op backend of its own (fxllm/backends/triton/__init__.py), so which one runs is
# the lowering's per-node choice, visible in `fxllm compile --explain`, never a process-wide switch:
# "triton" (default): the decode kernel writes this step's k/v itself (one launch fewer per layer and step);
# "triton_separate_write": the separate KV write kernel first (the path before; benchmarks compare);
# "triton_pdl": experimental, decode and combine launched with programmatic dependent launch (sm_90+,
# docs/kernels.md); "triton_swap_ab" / "triton_swap_ab_wide" / "triton_fp8_dot": the decode kernel's SWAP_AB /
# SWAP_AB + WIDE / FP8_DOT (+ SWAP_AB) key loops whatever the rule in paged_attention_decode_choice.py says
# (triton_fp8_dot needs an FP8 cache, else it raises). All but the first run only where compile.op_backends
# names them.
VARIANTS: dict[str, dict[str, bool]] = {
    "triton": {"write_in_decode": True, "pdl": False},
    "triton_separate_write": {"write_in_decode": False, "pdl": False},
    "triton_pdl": {"write_in_decode": True, "pdl": True},
    "triton_swap_ab": {"write_in_decode": True, "pdl": False, "swap_ab": True},
    "triton_swap_ab_wide": {"write_in_decode": True, "pdl": False, "swap_ab": True, "wide": True},
    "triton_fp8_dot": {"write_in_decode": True, "pdl": False, "swap_ab": True, "fp8_dot": True},
}
_DOT_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _decode_splits(num_seqs: int, num_kv_heads: int, max_ctx: int, block_n: int, device: torch.device) -> int:
    """KV splits per (sequence, KV head): ~4 programs per SM, from shapes only (no host sync)."""
    if device.type != "cuda":
        sms = 8  # interpreter runs: a few splits, so that tests exercise the combine step
    else:
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    # At most 4 programs per SM in all: no partial last wave (H100, S=8 x 8K context, Hkv=8: 9 splits
    # took 190 us, 8 or 16 splits ~135 us); S=1 x 32K ran 1.2x faster with 64 splits than with 32.
    splits = 4 * sms // max(1, num_seqs * num_kv_heads)
    return max(1, min(splits, _MAX_SPLITS, triton.cdiv(max_ctx, block_n)))


def _page_rows(block_size: int, block_n: int, use_window: bool) -> int:
    """The kernels' PAGE_ROWS: block_size if key tiles can be whole pages (a power of 2 dividing BLOCK_N, no
    window), else 0."""
    pow2 = block_size & (block_size - 1) == 0
    return block_size if pow2 and block_n % block_size == 0 and not use_window else 0


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def supported(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether the Triton kernels handle these inputs (else the op falls back to the reference)."""
    float_dtypes = (*_DOT_DTYPES, torch.float32)
    cache_dtypes = (*float_dtypes, FP8_KV_DTYPE)
    return (
        q.dim() == 3
        and k_cache.dim() == 4
        and q.shape[1] % k_cache.shape[2] == 0
        and q.shape[-1] == k_cache.shape[-1]
        and q.dtype in float_dtypes
        and k_cache.dtype in cache_dtypes
        and v_cache.dtype in cache_dtypes
        and is_fp8(k_cache.dtype) == is_fp8(v_cache.dtype)
    )


def rope_supported(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether the kernels can rotate q/k in-kernel: cos/sin [>= T, D] of q's dtype, even D, k of q's dtype."""
    return (
        cos.dim() == 2
        and cos.shape == sin.shape
        and cos.shape[0] >= q.shape[0]
        and cos.shape[1] == q.shape[-1] == k.shape[-1]
        and q.shape[-1] % 2 == 0
        and q.dtype == k.dtype == cos.dtype == sin.dtype
    )


def _rope_args(
    cos: Tensor | None, sin: Tensor | None, dummy: Tensor
) -> tuple[Tensor, Tensor, int, int, int, int]:
    """(cos, sin, their token and dim strides) for the kernels; a never-read dummy without RoPE."""
    if cos is None or sin is None:
        return dummy, dummy, 0, 0, 0, 0
    return cos, sin, cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)


def _scale_args(scale: Tensor | None, dummy: Tensor, num_kv_heads: int) -> tuple[Tensor, int]:
    """(pointer, per-head stride) of a KV scale: stride 0 for one value, 1 for one per KV head."""
    if scale is None:
        return dummy, 0
    if scale.numel() not in (1, num_kv_heads):
        raise ValueError(f"a KV scale has {scale.numel()} values, not 1 or {num_kv_heads} (one per KV head)")
    return scale.to(torch.float32).contiguous(), 0 if scale.numel() == 1 else 1


def paged_attention_out(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
    block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, scale: float,
    sliding_window: int, softcap: float, sinks: Tensor | None, out: Tensor,
    *, num_splits: int | None = None, block_m: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
    k_scale: Tensor | None = None, v_scale: Tensor | None = None,
    cos: Tensor | None = None, sin: Tensor | None = None, write_in_decode: bool = True, pdl: bool = False,
    fp8_f16: bool = True, swap_ab: bool | None = None, fp8_dot: bool | None = None, wide: bool | None = None,
    direct: bool = True, max_registers: int | None = None, prefetch_tiles: int | None = None,
    page_tiles: bool | None = None,
) -> None:  # fmt: skip
    """Write k/v into the caches, then paged attention into `out` [T, Hq, Dv]; launch knobs overridable.

    With cos/sin ([T, D], see `rope_supported`) q and k are RoPE-rotated in-kernel first (the fused op). On the
    decode path the decode kernel writes this step's k/v itself unless `write_in_decode` is False; `pdl`
    launches decode and combine with programmatic dependent launch (see VARIANTS). `fp8_f16`: over an FP8
    cache and a bfloat16 q the decode kernel computes in float16 (e4m3 -> f16 is one instruction): 0.90x
    the time of the bfloat16 conversion at 8B heads on an H200 (benchmarks/gpu_decode_sweep.py).
    `swap_ab` / `fp8_dot` (issue 15): the decode kernel's alternative key loops (paged_attention_decode_loops.py):
    transposed scores (K and V^T as the dots' A operand), and over an FP8 cache e4m3 dots with q and P quantized
    in-kernel; also for a mixed step's decode rows. None: the rule of paged_attention_decode_choice.py (swap-AB
    with WIDE over an FP8 cache, the default loop over others: the H200 sweeps' winners). `wide`: the swap-AB loop with its
    tiles renumbered for wide e4m3 loads (WIDE, implies swap_ab). `direct=False`: a one-split swap-AB decode
    still writes partials for the combine kernel (the launch before DIRECT, for comparison). `max_registers`
    (GPU only): ptxas's register cap for a decode or prefill launch (Triton's maxnreg), to fit more programs per
    SM.
    `prefetch_tiles` (GPU only, tiles of whole pages): the decode kernel prefetches the K/V rows of its first key
    tiles into L2 with its first loads; None: the loop's (paged_attention_decode_choice.PREFETCH_TILES).
    `page_tiles`: the prefill kernel's key tiles are whole cache pages where the block size allows (as the decode
    kernel's always are); None: `PREFILL_PAGE_TILES`."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    head_dim_v = v_cache.shape[-1]
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0:
        return
    group = num_heads // num_kv_heads
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    block_tables = _unit_last(block_tables)
    # 1-D index tensors are read as ptr + i: make them unit-stride (a no-op when they already are).
    slot_mapping, seq_lens, query_start_loc = (
        t.contiguous() for t in (slot_mapping, seq_lens, query_start_loc)
    )
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dim >= 16
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    decode = num_tokens == num_seqs
    kc, vc = k_cache.stride(), v_cache.stride()
    kv_fp8 = is_fp8(k_cache.dtype)
    if kv_fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an FP8 KV cache needs k_scale and v_scale (float32 device tensors, [1] or [Hkv])")
    # The key loops scale each row's max instead of every score (`_attend_range`), which needs a positive
    # scale (an FP8 cache's k_scale, a device tensor, is an amax / 448 and multiplies it).
    if not scale > 0:
        raise ValueError(f"the attention scale must be > 0, got {scale!r}")
    (ks, sks), (vs, svs) = (_scale_args(s, q, num_kv_heads) for s in (k_scale, v_scale))
    rope = cos is not None
    rope_args = _rope_args(cos, sin, q)
    write_in_decode = decode and write_in_decode
    # A prefill step's q is rotated once, by the KV write kernel, into a buffer the attention kernels read
    # as is: rotating it in the prefill kernel's prologue held four [128, 128] float32 tiles, 25% of the
    # kernel's time on an H200 (8B heads, 4 x 2,048: 0.724 ms with RoPE in-kernel, 0.577 without,
    # benchmarks/gpu_prefill_mix.py). A decode step's one token per sequence stays in-kernel.
    rotate_q = rope and not decode
    q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device) if rotate_q else q
    if not write_in_decode:
        _write_kv_kernel[(num_tokens,)](
            k, v, k_cache, v_cache, slot_mapping, query_start_loc, out,
            num_seqs, num_kv_heads, num_heads, block_size,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1], vc[2],
            out.stride(0), out.stride(1), ks, vs, sks, svs, *rope_args,
            q, q.stride(0), q.stride(1), q_rot, q_rot.stride(0), q_rot.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
            BLOCK_HKV=triton.next_power_of_2(num_kv_heads), BLOCK_HQ=triton.next_power_of_2(num_heads),
            BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_DV=triton.next_power_of_2(head_dim_v),
            ZERO_PADDING=not decode, KV_FP8=kv_fp8, ROPE=rope, ROTATE_Q=rotate_q, num_warps=4,
        )  # fmt: skip
    if rotate_q:  # the attention kernels below read the rotated q and rotate nothing themselves
        q, rope, rope_args = q_rot, False, _rope_args(None, None, q)
    # float32 (or mixed) inputs: IEEE float32 dots, not tf32, so float32 stays exact to ~1e-7.
    # FP8 tiles are converted to q's dtype in-kernel, so they dot in q's dtype.
    same_dtype = kv_fp8 or q.dtype == k_cache.dtype == v_cache.dtype
    f32_dot = not (same_dtype and q.dtype in _DOT_DTYPES)
    use_window, use_softcap = sliding_window > 0, softcap > 0.0
    sink_arg = sinks if sinks is not None else q  # never read without HAS_SINKS
    group_p = triton.next_power_of_2(group)
    on_gpu = q.device.type == "cuda"
    reg_cap = {"maxnreg": max_registers} if max_registers and on_gpu else {}  # no maxnreg in the interpreter
    fp8_f16 = fp8_f16 and kv_fp8 and q.dtype == torch.bfloat16  # float32 q keeps its precision
    if fp8_dot and not kv_fp8:
        raise ValueError("fp8_dot needs an FP8 KV cache (float8_e4m3fn)")
    # A prefill step outside a CUDA graph capture also carries the sequences that are decoding (chunked
    # prefill): their one query token goes to the decode kernel, the prefill kernel skips them. Given to the
    # prefill kernel, each such row took a whole query block over its context: in 256 x 2048/128 on an H200
    # as much work again as the step's prompt tokens (RESULTS.md). Captured graphs hold uniform steps
    # (decode, or 1 + k verify tokens), where the two extra launches would be pure cost.
    split_mixed = not decode and num_seqs > 1 and not (on_gpu and torch.cuda.is_current_stream_capturing())
    if decode or split_mixed:
        pdl = pdl and on_gpu and decode
        # The launch knobs tune the kernel of the step's kind: a mixed step's decode rows use the defaults.
        knobs = (block_n, num_warps, num_stages) if decode else (None, None, None)
        loop = choose_decode_loop(kv_fp8, head_dim, swap_ab, fp8_dot, *knobs, wide=wide)
        bn = loop.block_n
        splits = num_splits or _decode_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size, bn,
                                              q.device)  # fmt: skip
        # One split (a batch that fills the GPU by itself: 1,000 x 8 KV heads on an H200) needs no merge: the
        # decode kernel writes the output, and the combine launch (28 us a layer at 1,024 sequences) is saved.
        # Only for the swap-AB loops (the FP8 cache's), where it measured faster: decode + combine 217.0 vs
        # 223.6 us (1,000 x 129-256), 198.8 vs 225.7 (256 x 1,024), 112.8 vs 119.4 (64 x 2,048); the default
        # loop (bf16 cache) measured slower with it: 282.0 vs 276.9, 303.6 vs 280.0, 193.2 vs 143.9 (H200,
        # gpu_decode_sweep.py, fifteenth session): compiled for sm_90 it takes 163 registers instead of 128
        # (the swap-AB loop 98 instead of 96), so fewer programs fit an SM: any bf16 store from its epilogue does
        # that (addresses formed after the loop, contiguous or transposed: 161-164), its float32 partials do not.
        direct = direct and decode and splits == 1 and loop.swap_ab
        # Whole-page key tiles (`_page_rows`), H200: the FP8 loop's tile 628 -> 518 instructions, 216.5 -> 183.0 us
        # at 1,000 x 129-256 (gpu_decode_sweep.py, sixteenth session; with the row sums kept per key lane).
        page_rows = _page_rows(block_size, bn, use_window)
        # The prefetch is inline PTX (no interpreter); it needs whole-page tiles (the same block-table walk).
        if prefetch_tiles is None:
            prefetch_tiles = loop.prefetch_tiles
        prefetch_tiles = prefetch_tiles if on_gpu and page_rows else 0
        if direct:
            part = lse = out  # not read or written with DIRECT
        else:
            lse = torch.empty((num_seqs, num_heads, splits), dtype=torch.float32, device=q.device)
            part = lse.new_empty((num_seqs, num_heads, splits, head_dim_v))
        _decode_kernel[(num_seqs, num_kv_heads, splits)](
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, part, lse,
            num_seqs, num_heads, group, block_size, splits,
            q.stride(0), q.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1], vc[2], block_tables.stride(0),
            block_tables.shape[1], scale, softcap, sliding_window, ks, vs, sks, svs, *rope_args,
            k, v, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out, out.stride(0), out.stride(1), sink_arg,
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_H=max(16, group_p), BLOCK_N=bn,
            BLOCK_D=block_d, BLOCK_DV=block_dv, USE_SOFTCAP=use_softcap, USE_WINDOW=use_window,
            F32_DOT=f32_dot, KV_FP8=kv_fp8, ROPE=rope, WRITE_KV=write_in_decode, USE_PDL=pdl, FP8_F16=fp8_f16,
            MIXED=split_mixed, SWAP_AB=loop.swap_ab, FP8_DOT=loop.fp8_dot, WIDE=loop.wide,
            DIRECT=direct, HAS_SINKS=sinks is not None,
            PAGE_ROWS=page_rows, PREFETCH_TILES=prefetch_tiles,
            num_warps=loop.num_warps, num_stages=loop.num_stages, launch_pdl=pdl, **reg_cap,
        )  # fmt: skip
        # A captured decode graph fixes its splits, so BLOCK_S follows them; a mixed step's splits change with
        # its batch and contexts, and each BLOCK_S would be one more Triton compile in a user's request: one
        # size covers them all (its masked rows cost nothing next to a prefill step).
        if direct:
            return
        block_s = (
            triton.next_power_of_2(splits) if decode else max(_MAX_SPLITS, triton.next_power_of_2(splits))
        )
        _combine_kernel[(num_seqs, num_heads)](
            part, lse, sink_arg, query_start_loc, out, num_seqs, num_heads, splits, out.stride(0), out.stride(1),
            HAS_SINKS=sinks is not None, HEAD_DIM_V=head_dim_v, BLOCK_S=block_s,
            BLOCK_DV=block_dv, USE_PDL=pdl, MIXED=split_mixed, num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
        if decode:
            return
    bm, bn, warps, stages = prefill_launch(head_dim, on_gpu, block_m, block_n, num_warps, num_stages)
    block_q = max(1, bm // group_p)
    page_tiles = PREFILL_PAGE_TILES if page_tiles is None else page_tiles
    page_rows = _page_rows(block_size, bn, use_window) if page_tiles else 0
    _prefill_kernel[(num_tokens // block_q + num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sink_arg, out,
        num_seqs, group, block_size,
        q.stride(0), q.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1], vc[2], block_tables.stride(0),
        out.stride(0), out.stride(1), scale, softcap, sliding_window, ks, vs, sks, svs, *rope_args,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_N=bn,
        BLOCK_D=block_d, BLOCK_DV=block_dv, USE_SOFTCAP=use_softcap, USE_WINDOW=use_window,
        HAS_SINKS=sinks is not None, F32_DOT=f32_dot, KV_FP8=kv_fp8, ROPE=rope, SKIP_SINGLE=split_mixed,
        PAGE_ROWS=page_rows, num_warps=warps, num_stages=stages, **reg_cap,
    )  # fmt: skip


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
    block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, scale: float,
    sliding_window: int = -1, softcap: float = 0.0, sinks: Tensor | None = None,
    k_scale: Tensor | None = None, v_scale: Tensor | None = None, *, write_in_decode: bool = True,
    pdl: bool = False, swap_ab: bool | None = None, fp8_dot: bool | None = None, wide: bool | None = None,
) -> Tensor:  # fmt: skip
    """Triton paged attention (KV write + decode split-KV or prefill flash kernel), no host sync."""
    if not supported(q, k_cache, v_cache):
        from fxllm.ops.paged_attention import paged_attention_reference

        return paged_attention_reference(
            q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
            scale, sliding_window, softcap, sinks, k_scale, v_scale,
        )  # fmt: skip
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    paged_attention_out(
        q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
        scale, sliding_window, softcap, sinks, out, k_scale=k_scale, v_scale=v_scale,
        write_in_decode=write_in_decode, pdl=pdl, swap_ab=swap_ab, fp8_dot=fp8_dot, wide=wide,
    )  # fmt: skip
    return out


# Inputs `paged_attention_rope` handed to the reference (logged on the first of each reason, counted).
FALLBACKS: dict[str, int] = {}


def paged_attention_rope(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
    block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, cos: Tensor, sin: Tensor, scale: float,
    sliding_window: int = -1, softcap: float = 0.0, sinks: Tensor | None = None,
    k_scale: Tensor | None = None, v_scale: Tensor | None = None, *, write_in_decode: bool = True,
    pdl: bool = False, swap_ab: bool | None = None, fp8_dot: bool | None = None, wide: bool | None = None,
) -> Tensor:  # fmt: skip
    """Triton RoPE + paged attention: k rotated in the KV write, q rotated on load; no host sync."""
    reason = None
    if not supported(q, k_cache, v_cache):
        reason = "unsupported q/cache layout or dtype"
    elif not rope_supported(q, k, cos, sin):
        reason = "cos/sin not [>= T, D] of q's dtype, or odd D"
    if reason is not None:
        from fxllm.ops.paged_attention import paged_attention_rope_reference

        FALLBACKS[reason] = FALLBACKS.get(reason, 0) + 1
        if FALLBACKS[reason] == 1:
            logger.warning("paged_attention_rope runs the reference (slow, syncs): %s; q %s %s, cos %s %s",
                           reason, tuple(q.shape), q.dtype, tuple(cos.shape), cos.dtype)  # fmt: skip
        return paged_attention_rope_reference(
            q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc, cos, sin,
            scale, sliding_window, softcap, sinks, k_scale, v_scale,
        )  # fmt: skip
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    paged_attention_out(
        q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
        scale, sliding_window, softcap, sinks, out, k_scale=k_scale, v_scale=v_scale,
        cos=_unit_last(cos), sin=_unit_last(sin), write_in_decode=write_in_decode, pdl=pdl, swap_ab=swap_ab,
        fp8_dot=fp8_dot, wide=wide,
    )  # fmt: skip
    return out
