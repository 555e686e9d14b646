"""Triton paged attention: drop-in CUDA implementation of `fxllm::paged_attention`.

Three launches, none of which reads a value back to the host (the op runs inside CUDA graphs):
1. `_write_kv_kernel`, grid (T,): scatter this step's k/v rows into the caches at slot_mapping
   (-1 skipped); in the prefill path it also zeroes the output rows of padding tokens
   (t >= query_start_loc[-1]), which belong to no sequence.
2. Decode (T == S, one query per sequence, a shape fact): `_decode_kernel`, grid (S, Hkv, splits).
   One program takes all G = Hq/Hkv query heads of a KV head (padded to 16 rows for tl.dot) and one
   of `splits` equal slices of the sequence's key range (sliced in-kernel from seq_lens), and writes
   a normalised partial output plus its log-sum-exp; `_combine_kernel`, grid (T, Hq), merges the
   splits, adds the attention sink and writes zeros for padding tokens.
   Prefill / chunked prefill / mixed: `_prefill_kernel`, grid (T // BLOCK_Q + S, Hkv). Each program
   finds its (sequence, query block) by binary search over query_start_loc, takes BLOCK_Q tokens x G
   heads as BLOCK_M rows, and runs an online softmax over the sequence's paged keys, causal w.r.t.
   absolute positions (query i of a sequence of length L with q_len queries sits at L - q_len + i).
K/V tiles are BLOCK_N tokens gathered through the block table per token, so any block size works.
Scores and softmax are float32 (exp2, log2(e) = 1.4426950408889634 folded into the scale); P is rounded to the cache
dtype before P @ V, as the reference rounds its probabilities to v's dtype.
Arguments that change from step to step (the number of sequences, of KV splits) are not specialised
(`do_not_specialize`): Triton would otherwise compile another variant for the value 1 and for
multiples of 16, i.e. again while the decode buckets are captured.
FP8 caches (float8_e4m3fn, KV_FP8): the write kernel stores k / k_scale clamped to +-448; the attention kernels
convert the e4m3 tiles to q's dtype (exact: every e4m3 value is a bf16 value), fold k_scale into the score scale
and multiply the output by v_scale. Scales are device tensors ([1] or [Hkv], stride 0 or 1), read in-kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxllm.ops.kv_quant import FP8_KV_DTYPE, is_fp8


@triton.jit
def _mma(a, b, F32_DOT: tl.constexpr):
    if F32_DOT:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit(do_not_specialize=["num_seqs"])
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, qsl_ptr, out_ptr,
    num_seqs, n_kv_heads, n_heads, block_size,
    sk_t, sk_h, sv_t, sv_h,
    skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
    so_t, so_h, ks_ptr, vs_ptr, sks_h, svs_h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ZERO_PADDING: tl.constexpr, KV_FP8: tl.constexpr = False,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_HKV)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        km = (h < n_kv_heads)[:, None] & (d < HEAD_DIM)[None, :]
        kx = tl.load(k_ptr + t * sk_t + h[:, None] * sk_h + d[None, :], mask=km)
        if KV_FP8:  # saturate: e4m3fn has no inf, an out-of-range value would become NaN
            ks = tl.load(ks_ptr + h * sks_h, mask=h < n_kv_heads, other=1.0)
            kx = tl.clamp(kx.to(tl.float32) / ks[:, None], -448.0, 448.0)
        tl.store(kc_ptr + blk * skc_b + off * skc_s + h[:, None] * skc_h + d[None, :],
                 kx.to(kc_ptr.dtype.element_ty), mask=km)  # fmt: skip
        vm = (h < n_kv_heads)[:, None] & (dv < HEAD_DIM_V)[None, :]
        vx = tl.load(v_ptr + t * sv_t + h[:, None] * sv_h + dv[None, :], mask=vm)
        if KV_FP8:
            vs = tl.load(vs_ptr + h * svs_h, mask=h < n_kv_heads, other=1.0)
            vx = tl.clamp(vx.to(tl.float32) / vs[:, None], -448.0, 448.0)
        tl.store(vc_ptr + blk * svc_b + off * svc_s + h[:, None] * svc_h + dv[None, :],
                 vx.to(vc_ptr.dtype.element_ty), mask=vm)  # fmt: skip
    if ZERO_PADDING:  # noqa: SIM102  (a compile-time branch: kept apart so that it folds away)
        if t >= tl.load(qsl_ptr + num_seqs):
            hq = tl.arange(0, BLOCK_HQ)
            om = (hq < n_heads)[:, None] & (dv < HEAD_DIM_V)[None, :]
            zeros = tl.zeros((BLOCK_HQ, BLOCK_DV), dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + t * so_t + hq[:, None] * so_h + dv[None, :], zeros, mask=om)


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, q_pos, lo, hi,
    bt_ptr, kc_ptr, vc_ptr, kv_head, block_size,
    skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
    qk_scale, softcap, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, F32_DOT: tl.constexpr, MASKED: tl.constexpr = True,
):  # fmt: skip
    """Online softmax of q rows against keys [lo, hi) of one sequence; scores in log2 units.

    MASKED=False is the fast path for whole BLOCK_N tiles that every row may see in full (below the
    causal diagonal, no window): no bounds, causal or window masks on the loads or the scores.
    """
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d < HEAD_DIM
    dv_ok = dv < HEAD_DIM_V
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        off = k_pos % block_size
        if MASKED:
            k_ok = k_pos < hi
            page = tl.load(bt_ptr + k_pos // block_size, mask=k_ok, other=0).to(tl.int64)
            # K is loaded row-major ([tokens, D], each row contiguous in the cache), transposed in registers.
            k = tl.load(kc_ptr + page[:, None] * skc_b + off[:, None] * skc_s + kv_head * skc_h + d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        else:
            page = tl.load(bt_ptr + k_pos // block_size).to(tl.int64)
            k = tl.load(kc_ptr + page[:, None] * skc_b + off[:, None] * skc_s + kv_head * skc_h + d[None, :],
                        mask=d_ok[None, :], other=0.0)  # fmt: skip
        if k.dtype.is_fp8():  # exact in bf16/fp16/fp32; k_scale is folded into qk_scale by the caller
            k = k.to(q.dtype)
        s = _mma(q, tl.trans(k), F32_DOT)
        if USE_SOFTCAP:
            # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly at +-1.
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (s * qk_scale) / softcap) + 1.0)) * 1.4426950408889634
        else:
            s = s * (qk_scale * 1.4426950408889634)
        if MASKED:
            allowed = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing allowed yet keep m = -inf; shift by 0 there so no inf - inf appears.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED:
            v = tl.load(vc_ptr + page[:, None] * svc_b + off[:, None] * svc_s + kv_head * svc_h + dv[None, :],
                        mask=k_ok[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
        else:
            v = tl.load(vc_ptr + page[:, None] * svc_b + off[:, None] * svc_s + kv_head * svc_h + dv[None, :],
                        mask=dv_ok[None, :], other=0.0)  # fmt: skip
        if v.dtype.is_fp8():  # v_scale multiplies the caller's output
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, F32_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, qsl_ptr, part_ptr, lse_ptr,
    num_seqs, num_heads, group, block_size, num_splits,
    sq_t, sq_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, sbt,
    qk_scale, softcap, window, ks_ptr, vs_ptr, sks_h, svs_h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, F32_DOT: tl.constexpr, KV_FP8: tl.constexpr = False,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if seq < tl.load(qsl_ptr + num_seqs):  # else a padding token: the combine kernel writes zeros
        seq_len = tl.load(lens_ptr + seq)
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(seq_len - window, 0)
        # Equal slices of whole BLOCK_N tiles; some splits are empty when the sequence is short.
        per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
        start = lo + split * per_split
        end = tl.minimum(start + per_split, seq_len)
        hh = tl.arange(0, BLOCK_H)
        head = kv_head * group + hh
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + seq * sq_t + head[:, None] * sq_h + d[None, :],
                    mask=(hh < group)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # fmt: skip
        q_pos = tl.zeros((BLOCK_H,), dtype=tl.int32) + seq_len - 1
        acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
        m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
        qk = qk_scale
        if KV_FP8:
            qk = qk_scale * tl.load(ks_ptr + kv_head * sks_h)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, q_pos, start, end, bt_ptr + seq * sbt, kc_ptr, vc_ptr, kv_head, block_size,
            skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, qk, softcap, window,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, USE_SOFTCAP, USE_WINDOW, F32_DOT,
        )  # fmt: skip
        nonempty = l_i > 0.0
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        if KV_FP8:
            out = out * tl.load(vs_ptr + kv_head * svs_h)
        row = (seq * num_heads + head) * num_splits + split  # partials are [T, Hq, splits]
        dv = tl.arange(0, BLOCK_DV)
        tl.store(part_ptr + row[:, None] * HEAD_DIM_V + dv[None, :], out,
                 mask=(hh < group)[:, None] & (dv < HEAD_DIM_V)[None, :])  # fmt: skip
        tl.store(lse_ptr + row, lse, mask=hh < group)


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _combine_kernel(
    part_ptr, lse_ptr, sink_ptr, qsl_ptr, out_ptr,
    num_seqs, num_heads, num_splits, so_t, so_h,
    HAS_SINKS: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dv = tl.arange(0, BLOCK_DV)
    dmask = dv < HEAD_DIM_V
    o_ptrs = out_ptr + t * so_t + head * so_h + dv
    if t >= tl.load(qsl_ptr + num_seqs):
        tl.store(o_ptrs, tl.zeros((BLOCK_DV,), dtype=out_ptr.dtype.element_ty), mask=dmask)
    else:
        sp = tl.arange(0, BLOCK_S)
        row = (t * num_heads + head) * num_splits + sp
        lse = tl.load(lse_ptr + row, mask=sp < num_splits, other=float("-inf"))
        m = tl.max(lse, axis=0)
        if HAS_SINKS:
            sink = tl.load(sink_ptr + head).to(tl.float32) * 1.4426950408889634
            m = tl.maximum(m, sink)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)
        denom = tl.sum(w, axis=0)
        if HAS_SINKS:
            denom += tl.exp2(sink - m)
        part = tl.load(part_ptr + row[:, None] * HEAD_DIM_V + dv[None, :],
                       mask=(sp < num_splits)[:, None] & dmask[None, :], other=0.0)  # fmt: skip
        out = tl.sum(part * w[:, None], axis=0) / tl.where(denom > 0.0, denom, 1.0)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, qsl_ptr, sink_ptr, out_ptr,
    num_seqs, group, block_size,
    sq_t, sq_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, sbt, so_t, so_h,
    qk_scale, softcap, window, ks_ptr, vs_ptr, sks_h, svs_h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, F32_DOT: tl.constexpr,
    KV_FP8: tl.constexpr = False,
):  # fmt: skip
    # Last query blocks first: under the causal mask they see the most keys, so the long programs
    # start in the first wave and the short ones fill in behind them.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    # Sequence s owns program ids [qsl[s] // BLOCK_Q + s, qsl[s+1] // BLOCK_Q + s + 1): enough for
    # cdiv(q_len, BLOCK_Q) blocks, and the grid T // BLOCK_Q + S covers every sequence.
    left: tl.int32 = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
            left = mid + 1
        else:
            right = mid
    seq = left - 1
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q < q_len:
        seq_len = tl.load(lens_ptr + seq)
        ctx = seq_len - q_len  # absolute position of the first query
        r = tl.arange(0, BLOCK_Q * GROUP_P)
        tok = q_block * BLOCK_Q + r // GROUP_P
        hh = r % GROUP_P
        row_ok = (tok < q_len) & (hh < group)
        head = kv_head * group + hh
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + (q_start + tok).to(tl.int64)[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                    mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # fmt: skip
        q_pos = ctx + tok
        hi = tl.minimum(seq_len, ctx + tl.minimum((q_block + 1) * BLOCK_Q, q_len))
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(ctx + q_block * BLOCK_Q - window + 1, 0)
        acc = tl.zeros((BLOCK_Q * GROUP_P, BLOCK_DV), dtype=tl.float32)
        if HAS_SINKS:
            # The sink is one extra logit per head: start the online softmax from it.
            m_i = tl.load(sink_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            l_i = tl.full((BLOCK_Q * GROUP_P,), 1.0, dtype=tl.float32)
        else:
            m_i = tl.full((BLOCK_Q * GROUP_P,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_Q * GROUP_P,), dtype=tl.float32)
        bt_seq = bt_ptr + seq.to(tl.int64) * sbt
        qk = qk_scale
        if KV_FP8:
            qk = qk_scale * tl.load(ks_ptr + kv_head * sks_h)
        # Keys up to the block's first query position are visible to every row: whole tiles there skip
        # the masks; the tiles from `mid` on (the diagonal, or everything under a window) keep them.
        mid = lo
        if not USE_WINDOW:
            mid = lo + (ctx + q_block * BLOCK_Q + 1 - lo) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, q_pos, lo, mid, bt_seq, kc_ptr, vc_ptr, kv_head,
            block_size, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, qk, softcap, window,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, USE_SOFTCAP, USE_WINDOW, F32_DOT, False,
        )  # fmt: skip
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, q_pos, mid, hi, bt_seq, kc_ptr, vc_ptr, kv_head,
            block_size, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, qk, softcap, window,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, USE_SOFTCAP, USE_WINDOW, F32_DOT, True,
        )  # fmt: skip
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        if KV_FP8:
            out = out * tl.load(vs_ptr + kv_head * svs_h)
        dv = tl.arange(0, BLOCK_DV)
        tl.store(out_ptr + (q_start + tok).to(tl.int64)[:, None] * so_t + head[:, None] * so_h + dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv < HEAD_DIM_V)[None, :])  # fmt: skip


_MAX_SPLITS = 64
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
) -> None:  # fmt: skip
    """Write k/v into the caches, then paged attention into `out` [T, Hq, Dv]; launch knobs overridable."""
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
    (ks, sks), (vs, svs) = (_scale_args(s, q, num_kv_heads) for s in (k_scale, v_scale))
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, query_start_loc, out,
        num_seqs, num_kv_heads, num_heads, block_size,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1], vc[2],
        out.stride(0), out.stride(1), ks, vs, sks, svs,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads), BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_DV=triton.next_power_of_2(head_dim_v),
        ZERO_PADDING=not decode, KV_FP8=kv_fp8, num_warps=4,
    )  # fmt: skip
    # float32 (or mixed) inputs: IEEE float32 dots, not tf32, so float32 stays exact to ~1e-7.
    # FP8 tiles are converted to q's dtype in-kernel, so they dot in q's dtype.
    same_dtype = kv_fp8 or q.dtype == k_cache.dtype == v_cache.dtype
    f32_dot = not (same_dtype and q.dtype in _DOT_DTYPES)
    use_window, use_softcap = sliding_window > 0, softcap > 0.0
    sink_arg = sinks if sinks is not None else q  # never read without HAS_SINKS
    group_p = triton.next_power_of_2(group)
    on_gpu = q.device.type == "cuda"
    if decode:
        bn = block_n or 64
        splits = num_splits or _decode_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size, bn,
                                              q.device)  # fmt: skip
        part = torch.empty((num_tokens, num_heads, splits, head_dim_v), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32, device=q.device)
        _decode_kernel[(num_seqs, num_kv_heads, splits)](
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, part, lse,
            num_seqs, num_heads, group, block_size, splits,
            q.stride(0), q.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1], vc[2], block_tables.stride(0),
            scale, softcap, sliding_window, ks, vs, sks, svs,
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_H=max(16, group_p), BLOCK_N=bn,
            BLOCK_D=block_d, BLOCK_DV=block_dv, USE_SOFTCAP=use_softcap, USE_WINDOW=use_window,
            F32_DOT=f32_dot, KV_FP8=kv_fp8, num_warps=num_warps or 4, num_stages=num_stages or 3,
        )  # fmt: skip
        _combine_kernel[(num_tokens, num_heads)](
            part, lse, sink_arg, query_start_loc, out, num_seqs, num_heads, splits, out.stride(0), out.stride(1),
            HAS_SINKS=sinks is not None, HEAD_DIM_V=head_dim_v, BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_DV=block_dv, num_warps=4,
        )  # fmt: skip
        return
    # H100, Llama-3.1-8B heads (32/8, D 128), causal bf16 (benchmarks/gpu_attention.py sweep, RESULTS.md):
    # 128 x 32 tiles, 4 warps, 2 stages ran 0.85x / 0.92x SDPA flash on 4 x 2048 / 1 x 8192; the
    # previous 128 x 64 tiles with 8 warps and 3 stages 0.78x / 0.83x.
    small_head = on_gpu and head_dim <= 128
    bm = block_m or (128 if small_head else 64)
    bn = block_n or (32 if small_head else 64 if head_dim <= 128 else 32)
    warps = num_warps or (4 if small_head else 8 if bm >= 128 else 4)
    stages = num_stages or (2 if small_head else 3)
    block_q = max(1, bm // group_p)
    _prefill_kernel[(num_tokens // block_q + num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sink_arg, out,
        num_seqs, group, block_size,
        q.stride(0), q.stride(1), kc[0], kc[1], kc[2], vc[0], vc[1], vc[2], block_tables.stride(0),
        out.stride(0), out.stride(1), scale, softcap, sliding_window, ks, vs, sks, svs,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_N=bn,
        BLOCK_D=block_d, BLOCK_DV=block_dv, USE_SOFTCAP=use_softcap, USE_WINDOW=use_window,
        HAS_SINKS=sinks is not None, F32_DOT=f32_dot, KV_FP8=kv_fp8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
    block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, scale: float,
    sliding_window: int = -1, softcap: float = 0.0, sinks: Tensor | None = None,
    k_scale: Tensor | None = None, v_scale: Tensor | None = None,
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
    )  # fmt: skip
    return out
