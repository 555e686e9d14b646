"""Triton paged attention, shared device code: the KV write kernel and the jit helpers both attention
kernels call (`_attend_range`, the online softmax over paged key tiles; `_load_heads`, a tile of head
vectors, RoPE-rotated on load when the fused op asks for it).

RoPE (`ROPE`, the `fxllm::paged_attention_rope` op): rotate-half (NeoX) with this step's per-token cos/sin
tables [T, D]. A row's rotated value at d is x[d] * cos[d] + sign * x[partner] * sin[d], with partner =
d + D/2 (sign -1) in the first half and d - D/2 (sign +1) in the second: the same float32 products as the
standalone RoPE kernel (rotary.py), rounded once to the input's dtype, which is the dtype the unfused
graph hands attention. The partner is a second load of the same row (L1-resident), so the tile layout the
dots need is unchanged.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mma(a, b, F32_DOT: tl.constexpr, acc=None):
    """a @ b (+ acc, accumulated inside the tensor-core instruction: no separate pass over acc's registers)."""
    if F32_DOT:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _load_heads(
    ptr, row_off, row_ok, tok, cos_ptr, sin_ptr, sc_t, sc_d, ss_t, ss_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """Rows `ptr + row_off` ([R, BLOCK_D], zeros where masked); with ROPE, rotated by token `tok`'s cos/sin."""
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    x = tl.load(ptr + row_off[:, None] + d[None, :], mask=mask, other=0.0)
    if ROPE:
        half: tl.constexpr = HEAD_DIM // 2
        first = d < half
        partner = tl.where(first, d + half, d - half)
        xp = tl.load(ptr + row_off[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.where(first[None, :], -xp, xp)  # rotate_half(x) = [-x2, x1]
        c = tl.load(cos_ptr + tok[:, None] * sc_t + d[None, :] * sc_d, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + tok[:, None] * ss_t + d[None, :] * ss_d, mask=mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * c + xp * s).to(x.dtype)
    return x


@triton.jit
def _token_kv(
    k_ptr, v_ptr, t, h, h_ok, sk_t, sk_h, sv_t, sv_h, ks_ptr, vs_ptr, sks_h, svs_h,
    cos_ptr, sin_ptr, sc_t, sc_d, ss_t, ss_d,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    KV_FP8: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """Token t's k/v rows of KV heads `h` as the cache stores them: k RoPE-rotated with ROPE, FP8-scaled with KV_FP8."""
    dv = tl.arange(0, BLOCK_DV)
    # This step's key, RoPE-rotated here when the fused op passes cos/sin: the cache holds rotated keys.
    kx = _load_heads(k_ptr, t * sk_t + h * sk_h, h_ok, t + h * 0, cos_ptr, sin_ptr,
                     sc_t, sc_d, ss_t, ss_d, HEAD_DIM, BLOCK_D, ROPE)  # fmt: skip
    vx = tl.load(v_ptr + t * sv_t + h[:, None] * sv_h + dv[None, :],
                 mask=h_ok[:, None] & (dv < HEAD_DIM_V)[None, :])  # fmt: skip
    if KV_FP8:  # saturate: e4m3fn has no inf, an out-of-range value would become NaN
        ks = tl.load(ks_ptr + h * sks_h, mask=h_ok, other=1.0)
        vs = tl.load(vs_ptr + h * svs_h, mask=h_ok, other=1.0)
        kx = tl.clamp(kx.to(tl.float32) / ks[:, None], -448.0, 448.0)
        vx = tl.clamp(vx.to(tl.float32) / vs[:, None], -448.0, 448.0)
    return kx, vx


@triton.jit
def _store_token_kv(
    kx, vx, kc_ptr, vc_ptr, slot, h, h_ok, block_size, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """`_token_kv`'s rows into cache slot `slot` (>= 0)."""
    blk = slot // block_size
    off = slot % block_size
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    tl.store(kc_ptr + blk * skc_b + off * skc_s + h[:, None] * skc_h + d[None, :],
             kx.to(kc_ptr.dtype.element_ty), mask=h_ok[:, None] & (d < HEAD_DIM)[None, :])  # fmt: skip
    tl.store(vc_ptr + blk * svc_b + off * svc_s + h[:, None] * svc_h + dv[None, :],
             vx.to(vc_ptr.dtype.element_ty), mask=h_ok[:, None] & (dv < HEAD_DIM_V)[None, :])  # fmt: skip


@triton.jit(do_not_specialize=["num_seqs"])
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, qsl_ptr, out_ptr,
    num_seqs, n_kv_heads, n_heads, block_size,
    sk_t, sk_h, sv_t, sv_h,
    skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
    so_t, so_h, ks_ptr, vs_ptr, sks_h, svs_h,
    cos_ptr, sin_ptr, sc_t, sc_d, ss_t, ss_d, q_ptr, sq_t, sq_h, qr_ptr, sqr_t, sqr_h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ZERO_PADDING: tl.constexpr, KV_FP8: tl.constexpr = False, ROPE: tl.constexpr = False,
    ROTATE_Q: tl.constexpr = False,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    if ROTATE_Q:  # token t's query heads, RoPE-rotated into qr for the attention kernels (prefill steps)
        hq = tl.arange(0, BLOCK_HQ)
        hq_ok = hq < n_heads
        d = tl.arange(0, BLOCK_D)
        qx = _load_heads(q_ptr, t * sq_t + hq * sq_h, hq_ok, t + hq * 0, cos_ptr, sin_ptr,
                         sc_t, sc_d, ss_t, ss_d, HEAD_DIM, BLOCK_D, True)  # fmt: skip
        tl.store(qr_ptr + t * sqr_t + hq[:, None] * sqr_h + d[None, :], qx,
                 mask=hq_ok[:, None] & (d < HEAD_DIM)[None, :])  # fmt: skip
    h = tl.arange(0, BLOCK_HKV)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        kx, vx = _token_kv(k_ptr, v_ptr, t, h, h < n_kv_heads, sk_t, sk_h, sv_t, sv_h, ks_ptr, vs_ptr, sks_h, svs_h,
                           cos_ptr, sin_ptr, sc_t, sc_d, ss_t, ss_d, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, KV_FP8,
                           ROPE)  # fmt: skip
        _store_token_kv(kx, vx, kc_ptr, vc_ptr, slot, h, h < n_kv_heads, block_size,
                        skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV)  # fmt: skip
    if ZERO_PADDING:  # noqa: SIM102  (a compile-time branch: kept apart so that it folds away)
        if t >= tl.load(qsl_ptr + num_seqs):
            hq = tl.arange(0, BLOCK_HQ)
            dv = tl.arange(0, BLOCK_DV)
            om = (hq < n_heads)[:, None] & (dv < HEAD_DIM_V)[None, :]
            zeros = tl.zeros((BLOCK_HQ, BLOCK_DV), dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + t * so_t + hq[:, None] * so_h + dv[None, :], zeros, mask=om)


@triton.jit
def _tile_pages(bt_ptr, start, hi, BLOCK_N: tl.constexpr, PAGE_ROWS: tl.constexpr):
    """The cache page and row within it of keys start .. start + BLOCK_N (start a multiple of PAGE_ROWS)."""
    # One block-table entry per page of the tile, broadcast to the page's rows: per key, the entry's load and
    # a division by a runtime block size put ~100 integer instructions into every key tile of a decode loop.
    n_pages: tl.constexpr = BLOCK_N // PAGE_ROWS
    pidx = start // PAGE_ROWS + tl.arange(0, n_pages)
    pages = tl.load(bt_ptr + pidx, mask=pidx * PAGE_ROWS < hi, other=0).to(tl.int64)
    page = tl.reshape(tl.broadcast_to(pages[:, None], (n_pages, PAGE_ROWS)), (BLOCK_N,))
    return page, tl.arange(0, BLOCK_N) % PAGE_ROWS


@triton.jit
def _prefetch_l2(ptrs, ok):
    """Hints the lines at `ptrs` (where `ok`) into L2: PTX `prefetch`, no result, no wait (GPU only)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _prefetch_first_tiles(
    bt_ptr, bt_cols, seq_len, kc_ptr, vc_ptr, kv_head, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, go,
    KEYS: tl.constexpr, PAGE_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Prefetch the K and V rows of keys 0 .. KEYS (those below seq_len) into L2, where `go`.

    Issued with the prologue's first loads, this takes the block-table and K/V round trips of the key loop's
    first tiles off the chain that runs through the KV write and its barrier: the loop then finds its first
    pages in L1 and its first tiles in L2. The block-table entries are read without waiting for seq_len (up to
    the table's width `bt_cols`); an entry past the sequence is never dereferenced (the key mask).
    """
    # One prefetch per 128-byte line of a head's row (K and V rows alike: the caches share a dtype).
    line_elems: tl.constexpr = 1024 // kc_ptr.dtype.element_ty.primitive_bitwidth
    row_lines: tl.constexpr = max(1, HEAD_DIM // line_elems)
    # The key loop's page walk over keys 0 .. KEYS, bounded by the table's width instead of the sequence's length.
    page, row = _tile_pages(bt_ptr, 0, bt_cols * PAGE_ROWS, KEYS, PAGE_ROWS)
    key = tl.arange(0, KEYS)
    line = tl.arange(0, row_lines) * line_elems
    ok = ((key < seq_len) & go)[:, None] & (line >= 0)[None, :]
    _prefetch_l2(kc_ptr + page[:, None] * skc_b + row[:, None] * skc_s + kv_head * skc_h + line[None, :], ok)
    _prefetch_l2(vc_ptr + page[:, None] * svc_b + row[:, None] * svc_s + kv_head * svc_h + line[None, :], ok)


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, q_pos, lo, hi,
    bt_ptr, kc_ptr, vc_ptr, kv_head, block_size,
    skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
    qk_scale, softcap, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, F32_DOT: tl.constexpr, MASKED: tl.constexpr = True,
    PAGE_ROWS: tl.constexpr = 0, SUM_AFTER: tl.constexpr = False,
):  # fmt: skip
    """Online softmax of q rows against keys [lo, hi) of one sequence; scores in log2 units.

    MASKED=False is the fast path for whole BLOCK_N tiles that every row may see in full (below the
    causal diagonal, no window): no bounds, causal or window masks on the loads or the scores.
    PAGE_ROWS > 0 (the cache's block size, a power of two dividing BLOCK_N; lo a multiple of it): one
    block-table entry per page of a tile (`_tile_pages`, its loads bounds-masked). SUM_AFTER (l_i must come in as zeros):
    the row sums are kept per key column and reduced once after the loop; with the keys of a tile spread over
    the warps (decode: 16 query rows), a sum per tile is a cross-warp reduction, barriers included.
    """
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d < HEAD_DIM
    dv_ok = dv < HEAD_DIM_V
    if SUM_AFTER:
        l_acc = tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        if PAGE_ROWS > 0 and not MASKED:
            # A whole tile below hi: each key's entry loaded directly (L1 serves a page's repeats); fewer live
            # registers in the prefill kernel's loop than `_tile_pages`' broadcast (sm_90a, twentieth session).
            page = tl.load(bt_ptr + k_pos // PAGE_ROWS).to(tl.int64)
            off = k_pos % PAGE_ROWS
        elif PAGE_ROWS > 0:
            page, off = _tile_pages(bt_ptr, start, hi, BLOCK_N, PAGE_ROWS)
        else:
            off = k_pos % block_size
            if MASKED:
                page = tl.load(bt_ptr + k_pos // block_size, mask=k_ok, other=0).to(tl.int64)
            else:
                page = tl.load(bt_ptr + k_pos // block_size).to(tl.int64)
        # Bounds masks on the loads wherever the tile may run past hi: MASKED=False's tiles are whole tiles below
        # hi (`_tile_pages` bounds its own block-table loads).
        if MASKED:
            k_mask = k_ok[:, None] & d_ok[None, :]
            v_mask = k_ok[:, None] & dv_ok[None, :]
        else:
            k_mask = d_ok[None, :]
            v_mask = dv_ok[None, :]
        # K is loaded row-major ([tokens, D], each row contiguous in the cache), transposed in registers.
        k = tl.load(kc_ptr + page[:, None] * skc_b + off[:, None] * skc_s + kv_head * skc_h + d[None, :],
                    mask=k_mask, other=0.0)  # fmt: skip
        if k.dtype.is_fp8():  # exact in bf16/fp16/fp32; k_scale is folded into qk_scale by the caller
            k = k.to(q.dtype)
        s = _mma(q, tl.trans(k), F32_DOT)
        if USE_SOFTCAP:
            # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly at +-1.
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (s * qk_scale) / softcap) + 1.0)) * 1.4426950408889634
            c = 1.0  # s is in log2 units already
        else:
            # The scale is applied to the row max, not to every score: max(s) * c == max(s * c) for c > 0
            # (the launch checks the scale), and each score's s * c - m below is then one FMA.
            c = qk_scale * 1.4426950408889634
        if MASKED:
            allowed = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * c)
        m_use = m_new
        if MASKED:  # rows with nothing allowed yet keep m = -inf; shift by 0 there so no inf - inf appears
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * c - m_use[:, None])
        if SUM_AFTER:
            l_acc = l_acc * alpha[:, None] + p
        else:
            l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + page[:, None] * svc_b + off[:, None] * svc_s + kv_head * svc_h + dv[None, :],
                    mask=v_mask, other=0.0)  # fmt: skip
        if v.dtype.is_fp8():  # v_scale multiplies the caller's output
            v = v.to(q.dtype)
        acc = _mma(p.to(v.dtype), v, F32_DOT, acc * alpha[:, None])
        m_i = m_new
    if SUM_AFTER:
        l_i = tl.sum(l_acc, axis=1)
    return acc, m_i, l_i
