"""Triton paged attention, decode path (T == S: one query per sequence, a shape fact).

`_decode_kernel`, grid (S, Hkv, splits): one program takes all G = Hq/Hkv query heads of a KV head (padded
to 16 rows for tl.dot) and one of `splits` equal slices of the sequence's key range (sliced in-kernel from
seq_lens), and writes a normalised float32 partial output plus its log2-sum-exp. With WRITE_KV the program
whose slice holds the new token first writes this step's k/v of its KV head into the cache (no separate
write launch). USE_PDL (experimental, off by default; docs/kernels.md): both kernels launch with programmatic
dependent launch, wait for their predecessor before any memory access, and the decode kernel lets the combine
kernel launch once its key loop is done. SWAP_AB / FP8_DOT / WIDE (issue 15) pick the alternative key loops of
paged_attention_decode_loops.py (transposed scores; e4m3 dots over an FP8 cache; SWAP_AB with the tiles
renumbered so that their e4m3 bytes reach registers in wide shared-memory loads). `_combine_kernel`, grid
(T, Hq), merges the splits, adds the attention sink and writes zeros for padding tokens. DIRECT (a decode
step with one split: large batches) writes the output itself and no combine kernel runs. The prologue issues
all its loads before any branch on a loaded value or store (each had cost a dependent DRAM round trip before
the first key tile); PREFETCH_TILES (GPU only, inline PTX) then hints the first key tiles' K/V rows into L2
while the KV write and its barrier run. The launch is in paged_attention.py.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from fxllm.backends.triton.paged_attention_common import (
    _attend_range,
    _load_heads,
    _prefetch_first_tiles,
    _store_token_kv,
    _token_kv,
)
from fxllm.backends.triton.paged_attention_decode_loops import _attend_decode


# sbt varies with the longest context of a mixed step (see _prefill_kernel): not specialised on.
@triton.jit(do_not_specialize=["num_seqs", "num_splits", "sbt", "bt_cols"])
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, qsl_ptr, part_ptr, lse_ptr,
    num_seqs, num_heads, group, block_size, num_splits,
    sq_t, sq_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, sbt, bt_cols,
    qk_scale, softcap, window, ks_ptr, vs_ptr, sks_h, svs_h,
    cos_ptr, sin_ptr, sc_t, sc_d, ss_t, ss_d,
    k_ptr, v_ptr, slot_ptr, sk_t, sk_h, sv_t, sv_h, out_ptr, so_t, so_h, sink_ptr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, F32_DOT: tl.constexpr, KV_FP8: tl.constexpr = False,
    ROPE: tl.constexpr = False, WRITE_KV: tl.constexpr = False, USE_PDL: tl.constexpr = False,
    FP8_F16: tl.constexpr = False, MIXED: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
    FP8_DOT: tl.constexpr = False, WIDE: tl.constexpr = False, DIRECT: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False, PAGE_ROWS: tl.constexpr = 0, PREFETCH_TILES: tl.constexpr = 0,
):  # fmt: skip
    if (
        USE_PDL
    ):  # launched early (programmatic dependent launch): wait for the kernel before, read nothing first
        gdc_wait()
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # MIXED: a prefill step, where this kernel takes the sequences with one query token and the prefill kernel
    # the rest; else decode, where token `seq` is the sequence's one query (T == S).
    if MIXED:
        tok = tl.load(qsl_ptr + seq).to(tl.int64)
        live = tl.load(qsl_ptr + seq + 1) - tok == 1
        rows_ok = live  # a prefill or padding sequence's tok may be past the step's last token
    else:
        tok = seq
        # Else a padding token: the combine kernel writes its zeros, or with DIRECT this one.
        live = seq < tl.load(qsl_ptr + num_seqs)
        rows_ok = True  # T == S: tok is a row of q, k and v even for padding
    hh = tl.arange(0, BLOCK_H)
    head = kv_head * group + hh
    dv = tl.arange(0, BLOCK_DV)
    o_mask = (hh < group)[:, None] & (dv < HEAD_DIM_V)[None, :]
    o_ptrs = out_ptr + tok * so_t + head[:, None] * so_h + dv[None, :]
    # Every load the prologue needs is issued here, before any branch on a loaded value: the sequence's length,
    # its query rows, this step's k/v (rotated and scaled as the cache stores them), the slot, the scales. Each
    # branch on a loaded value (live, the slot) had put one more DRAM round trip in front of the key loop,
    # which at short contexts is a third of the kernel's time (benchmarks/RESULTS.md, seventeenth session).
    seq_len = tl.load(lens_ptr + seq)
    # Token `tok` is the sequence's one query; ROPE rotates it here.
    q = _load_heads(q_ptr, tok * sq_t + head * sq_h, (hh < group) & rows_ok, tok + hh * 0, cos_ptr, sin_ptr,
                    sc_t, sc_d, ss_t, ss_d, HEAD_DIM, BLOCK_D, ROPE)  # fmt: skip
    # e4m3 -> f16 is one instruction; bf16 q -> f16 is exact for |q| in [6e-5, 65504].
    if KV_FP8 and FP8_F16 and not FP8_DOT:
        q = q.to(tl.float16)
    qk = qk_scale
    v_scale = 1.0
    if KV_FP8:
        qk = qk_scale * tl.load(ks_ptr + kv_head * sks_h)
        v_scale = tl.load(vs_ptr + kv_head * svs_h)
    if WRITE_KV:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        hk = kv_head + tl.arange(0, 2)  # a two-row tile with one row used: the helpers take [R, D] tiles
        kx, vx = _token_kv(
            k_ptr, v_ptr, tok, hk, (hk == kv_head) & rows_ok, sk_t, sk_h, sv_t, sv_h, ks_ptr, vs_ptr, sks_h, svs_h,
            cos_ptr, sin_ptr, sc_t, sc_d, ss_t, ss_d, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, KV_FP8, ROPE,
        )  # fmt: skip
    # After the loads in program order: the prefetch waits for the block table, which no load above should.
    if PREFETCH_TILES > 0:  # GPU only (inline PTX); PAGE_ROWS > 0, so no window: split 0 starts at key 0
        _prefetch_first_tiles(
            bt_ptr + seq * sbt, bt_cols, seq_len, kc_ptr, vc_ptr, kv_head, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
            live & (split == 0), PREFETCH_TILES * BLOCK_N, PAGE_ROWS, HEAD_DIM,
        )  # fmt: skip
    if DIRECT and not live:
        tl.store(o_ptrs, tl.zeros((BLOCK_H, BLOCK_DV), dtype=out_ptr.dtype.element_ty), mask=o_mask)
    if live:
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(seq_len - window, 0)
        # Equal slices of whole BLOCK_N tiles; some splits are empty when the sequence is short.
        per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
        start = lo + split * per_split
        end = tl.minimum(start + per_split, seq_len)
        if WRITE_KV:
            # The program whose slice holds the new token (position seq_len - 1) stores this KV head's k/v
            # (one program per sequence and KV head, so no other CTA reads them), then reads them back from
            # the cache like every other key once the barrier has made the stores visible to the whole CTA.
            if (slot >= 0) & (start <= seq_len - 1) & (seq_len - 1 < end):
                _store_token_kv(kx, vx, kc_ptr, vc_ptr, slot, hk, hk == kv_head, block_size,
                                skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)  # fmt: skip
            tl.debug_barrier()
        if SWAP_AB or FP8_DOT:  # the alternative key loops (paged_attention_decode_loops.py)
            acc, m_i, l_i = _attend_decode(
                q, start, end, bt_ptr + seq * sbt, kc_ptr, vc_ptr, kv_head, block_size,
                skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, qk, softcap,
                HEAD_DIM, HEAD_DIM_V, BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, USE_SOFTCAP, F32_DOT, SWAP_AB, FP8_DOT,
                WIDE, PAGE_ROWS,
            )  # fmt: skip
        else:
            q_pos = tl.zeros((BLOCK_H,), dtype=tl.int32) + seq_len - 1
            acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
            m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
            acc, m_i, l_i = _attend_range(
                acc, m_i, l_i, q, q_pos, start, end, bt_ptr + seq * sbt, kc_ptr, vc_ptr, kv_head, block_size,
                skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, qk, softcap, window,
                HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, USE_SOFTCAP, USE_WINDOW, F32_DOT,
                PAGE_ROWS=PAGE_ROWS, SUM_AFTER=True,
            )  # fmt: skip
        if USE_PDL:  # the combine kernel may start now; it waits for this grid to finish before reading
            gdc_launch_dependents()
        nonempty = l_i > 0.0
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        if KV_FP8:
            out = out * v_scale
        if DIRECT:
            # One split: the combine kernel's merge reduces to this. Its sink weighs in as one more logit:
            # out * 2^lse / (2^lse + 2^sink), 0 for an empty range (lse = -inf).
            if HAS_SINKS:
                sink = tl.load(sink_ptr + head, mask=hh < group, other=0.0).to(tl.float32)
                sink = sink * 1.4426950408889634  # log2(e): lse is in base 2
                out = out * tl.where(nonempty, 1.0 / (1.0 + tl.exp2(sink - lse)), 0.0)[:, None]
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            row = (seq * num_heads + head) * num_splits + split  # partials are [S, Hq, splits]
            tl.store(part_ptr + row[:, None] * HEAD_DIM_V + dv[None, :], out, mask=o_mask)
            tl.store(lse_ptr + row, lse, mask=hh < group)


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _combine_kernel(
    part_ptr, lse_ptr, sink_ptr, qsl_ptr, out_ptr,
    num_seqs, num_heads, num_splits, so_t, so_h,
    HAS_SINKS: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_PDL: tl.constexpr = False, MIXED: tl.constexpr = False,
):  # fmt: skip
    if USE_PDL:
        gdc_wait()
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dv = tl.arange(0, BLOCK_DV)
    dmask = dv < HEAD_DIM_V
    if MIXED:  # only the one-token sequences the decode kernel took; the prefill kernel wrote the rest
        t = tl.load(qsl_ptr + seq).to(tl.int64)
        live = tl.load(qsl_ptr + seq + 1) - t == 1
    else:
        t = seq
        live = seq < tl.load(qsl_ptr + num_seqs)
        if not live:  # a padding token
            tl.store(out_ptr + t * so_t + head * so_h + dv, tl.zeros((BLOCK_DV,), dtype=out_ptr.dtype.element_ty),
                     mask=dmask)  # fmt: skip
    o_ptrs = out_ptr + t * so_t + head * so_h + dv
    if live:
        sp = tl.arange(0, BLOCK_S)
        row = (seq * num_heads + head) * num_splits + sp
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
