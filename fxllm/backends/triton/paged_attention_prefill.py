"""Triton paged attention, prefill / chunked prefill / mixed path (T != S).

`_prefill_kernel`, grid (T // BLOCK_Q + S, Hkv): each program finds its (sequence, query block) by binary
search over query_start_loc, takes BLOCK_Q tokens x G heads as BLOCK_M rows, and runs an online softmax
over the sequence's paged keys, causal w.r.t. absolute positions (query i of a sequence of length L with
q_len queries sits at L - q_len + i). PAGE_ROWS > 0 (the cache's block size, a power of two dividing BLOCK_N;
no window): key tiles of whole pages, one block-table entry per page (`_tile_pages`). The launch is in
paged_attention.py, its default tiles and warps here (`prefill_launch`).
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from fxllm.backends.triton.paged_attention_common import _attend_range, _load_heads


class PrefillLaunch(NamedTuple):
    """The prefill kernel's tiles and launch (the keyword names of `paged_attention_out`)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def prefill_launch(
    head_dim: int, on_gpu: bool, block_m: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> PrefillLaunch:  # fmt: skip
    """The prefill kernel's launch: the caller's values where given, else the defaults."""
    # Llama-3.1-8B heads, causal bf16, H200, once the key loop stopped spilling: 128 x 64 tiles x 4 warps x 3
    # stages ran 0.395 / 1.18 ms at 4 x 2,048 / 1 x 8,192 against SDPA flash's 0.484 / 1.71, within 0.5% of the
    # sweep's best (gpu_attention.py --sweep; RESULTS.md, twenty-first session).
    small_head = on_gpu and head_dim <= 128
    bm = block_m or (128 if small_head else 64)
    bn = block_n or (64 if head_dim <= 128 else 32)
    warps = num_warps or (4 if small_head else 8 if bm >= 128 else 4)
    return PrefillLaunch(bm, bn, warps, num_stages or 3)


# sbt (the block table's row stride) is the step's longest context in blocks: specialising on it (== 1, % 16)
# compiled a new variant when a real run's first long prompt arrived (H200, 256 x 2048/128). The cache strides
# are constexprs instead: fixed by the model's cache layout (one compile per model), and as runtime values they
# held registers that spilled inside the key loop at 128 x 64 x 4 warps (sm_90a SASS, prefill_sm90.py).
@triton.jit(do_not_specialize=["num_seqs", "sbt"])
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, qsl_ptr, sink_ptr, out_ptr,
    num_seqs, group, block_size,
    sq_t, sq_h, skc_b: tl.constexpr, skc_s: tl.constexpr, skc_h: tl.constexpr, svc_b: tl.constexpr,
    svc_s: tl.constexpr, svc_h: tl.constexpr, sbt, so_t, so_h,
    qk_scale, softcap, window, ks_ptr, vs_ptr, sks_h, svs_h,
    cos_ptr, sin_ptr, sc_t, sc_d, ss_t, ss_d,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, F32_DOT: tl.constexpr,
    KV_FP8: tl.constexpr = False, ROPE: tl.constexpr = False, SKIP_SINGLE: tl.constexpr = False,
    PAGE_ROWS: tl.constexpr = 0,
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
    run = q_block * BLOCK_Q < q_len
    # With SKIP_SINGLE, sequences with one query token are the decode kernel's (paged_attention.py, mixed steps).
    if SKIP_SINGLE:
        run = run & (q_len != 1)
    if run:
        seq_len = tl.load(lens_ptr + seq)
        ctx = seq_len - q_len  # absolute position of the first query
        r = tl.arange(0, BLOCK_Q * GROUP_P)
        tok = q_block * BLOCK_Q + r // GROUP_P
        hh = r % GROUP_P
        row_ok = (tok < q_len) & (hh < group)
        head = kv_head * group + hh
        flat_tok = (q_start + tok).to(tl.int64)
        q = _load_heads(q_ptr, flat_tok * sq_t + head * sq_h, row_ok, flat_tok, cos_ptr, sin_ptr,
                        sc_t, sc_d, ss_t, ss_d, HEAD_DIM, BLOCK_D, ROPE)  # fmt: skip
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
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, USE_SOFTCAP, USE_WINDOW, F32_DOT, False, PAGE_ROWS,
        )  # fmt: skip
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, q_pos, mid, hi, bt_seq, kc_ptr, vc_ptr, kv_head,
            block_size, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, qk, softcap, window,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, USE_SOFTCAP, USE_WINDOW, F32_DOT, True, PAGE_ROWS,
        )  # fmt: skip
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        if KV_FP8:
            out = out * tl.load(vs_ptr + kv_head * svs_h)
        # The store's rows from scalars and a fresh arange, not the row vectors of the q load: kept live across
        # the key loops, those spilled inside them (sm_90a, 128 x 64 x 4 warps: 41 local loads a key tile).
        out_base = (q_start + q_block * BLOCK_Q).to(tl.int64) * so_t + (kv_head * group) * so_h
        ro = tl.arange(0, BLOCK_Q * GROUP_P)
        rows_ok = (ro // GROUP_P < q_len - q_block * BLOCK_Q) & (ro % GROUP_P < group)
        dv = tl.arange(0, BLOCK_DV)
        tl.store(out_ptr + out_base + ((ro // GROUP_P) * so_t + (ro % GROUP_P) * so_h)[:, None] + dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & (dv < HEAD_DIM_V)[None, :])  # fmt: skip
