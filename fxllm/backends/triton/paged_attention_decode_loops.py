"""Triton paged attention, decode path: alternative key loops of `_decode_kernel` (issue 15), constexpr switches.

Over an FP8 cache the default loop (`_attend_range`, paged_attention_common.py) converts each e4m3 K/V tile
in registers and the Hopper dot (wgmma) then reads it from shared memory (wgmma takes B only from shared
memory, A from registers or shared memory): on an H200 it ran slower than over a bf16 cache although it
reads half the bytes (benchmarks/RESULTS.md, eleventh session). Two levers, separately switchable:

SWAP_AB: scores transposed, s^T = K q^T ([BLOCK_N, D] x [D, BLOCK_H]) and acc^T = V^T P^T
([BLOCK_DV, BLOCK_N] x [BLOCK_N, BLOCK_H]): the big, freshly loaded (and converted) tile is the A operand,
which wgmma may take from registers, and the tiny q^T / P^T (BLOCK_H = 16 columns) is B. wgmma's M is 64,
so BLOCK_N >= 64 for the first dot (TensorRT-LLM's XQA and FlashInfer do this for small GQA groups).

FP8_DOT (FP8 cache only): the dots in e4m3 with float32 accumulation, no tile conversion at all. q is
quantized per row in-kernel (scale = amax / 448, folded into the row's score scale); P, in [0, 1] after the
running max, is multiplied by 256 (a power of two: exact, and p * 256 <= 448, e4m3's largest value) and
rounded to e4m3; the 1/256 is undone on the float32 accumulator. The row sums l use the float32 P. Error:
e4m3 keeps 3 mantissa bits, so q and P carry up to 2^-4 relative rounding each (FlashAttention-3's FP8
forward path makes the same two roundings); see tests/test_decode_variants.py for the measured error and
its tolerance. Triton's fp8 wgmma wants both shared-memory operands K-major: in the plain orientation
V [BLOCK_N, DV] is N-major in the cache (DV contiguous), so Triton's lowering has to transpose it on the
way to the dot; with SWAP_AB, V^T is the A operand, converted to the register layout A needs.

WIDE (with SWAP_AB, not FP8_DOT; loop "swap_ab_wide"): over an FP8 cache the swap-AB loop above stages the
e4m3 tiles in shared memory (cp.async) and reads them back into the dot operand's registers, where a thread
holds 2 neighbouring K-dim elements per row and 16-bit register (wgmma's / mma.sync's A fragment, kWidth 2):
2-byte shared loads for K, and single bytes for V^T, whose K dim (the keys) is not the contiguous one (sm_90a:
64 ld.shared.b8 + 32 ld.shared.b16 per 64-key tile and thread, 8-byte cp.async). A dot's sum does not care
in which order it runs over K, nor the output in which order its rows come, so WIDE renumbers both: the K
tile's head dims (and q's, the same way: `_perm_k`) so that the D/4 columns a thread holds per row are D/4
contiguous bytes of the cache row, and V^T's rows (the output's head dims, undone once after the loop:
`_perm_m`) so that a thread's 4 rows are 4 contiguous bytes of a key's V row. The renumbering is a reshape and
a permute of the loaded tile, which Triton's layout propagation folds into the shared-memory read: 16-byte
cp.async, ld.shared.v4 for K, ld.shared.b32 + byte permutes for V, packed e4m3x2 -> f16x2 conversions, no
convert_layout through shared memory (benchmarks/fp8_decode_ptx.py counts them). Laid out for 4 warps
(one warpgroup along M); with 8 the V reads are 2 bytes wide. Same math as SWAP_AB up to summation order.

PAGE_ROWS (> 0: the cache's block size as a constant, tiles of whole pages; paged_attention_common._tile_pages)
looks up one block-table entry per page instead of one per key. The row sums l are kept per key lane
([BLOCK_N, BLOCK_H]) and reduced once after the loop: the keys are spread over the warps, so a sum per tile
would cross warps through shared memory and barriers (8 barriers per tile before, 5 after; the max still
needs its reduction).

Decode needs no causal mask (the one query is the last position: every key below seq_len is visible) and
no window mask (the caller starts the range at seq_len - window), so only k_pos < hi is masked.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fxllm.backends.triton.paged_attention_common import _mma, _tile_pages

_LOG2E = tl.constexpr(1.4426950408889634)  # jit code reads globals only as tl.constexpr
# P's power-of-two scale before the e4m3 rounding: p * 256 is at most 256 < 448 (no saturation); the
# smallest e4m3 subnormal 2^-9 then represents p = 2^-17, below which a probability rounds to zero.
_P_SCALE = tl.constexpr(256.0)


@triton.jit
def _load_v(vc_ptr, page, off, kv_head, svc_b, svc_s, svc_h, dv, k_ok, dv_ok, TRANSPOSED: tl.constexpr):
    """A V tile: [BLOCK_N, BLOCK_DV], or with TRANSPOSED V^T [BLOCK_DV, BLOCK_N] read in that shape."""
    if TRANSPOSED:
        v = tl.load(vc_ptr + page[None, :] * svc_b + off[None, :] * svc_s + kv_head * svc_h + dv[:, None],
                    mask=k_ok[None, :] & dv_ok[:, None], other=0.0)  # fmt: skip
    else:
        v = tl.load(vc_ptr + page[:, None] * svc_b + off[:, None] * svc_s + kv_head * svc_h + dv[None, :],
                    mask=k_ok[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
    return v


@triton.jit
def _perm_k(x, R: tl.constexpr, D: tl.constexpr):
    """[R, D] -> [R, D], column kb*16 + h*8 + c*2 + e taken from column c*(D/4) + kb*4 + h*2 + e (WIDE)."""
    # In the A fragment lane c (of 4 along K) holds, per 16-wide k step kb, columns kb*16 + c*2 + {0, 1, 8, 9}:
    # after this renumbering they are c's contiguous D/4 bytes of the row.
    x = tl.reshape(x, (R, 4, D // 16, 2, 2))
    x = tl.permute(x, (0, 2, 3, 1, 4))
    return tl.reshape(x, (R, D))


@triton.jit
def _perm_m(x, M: tl.constexpr, N: tl.constexpr):
    """[M, N] -> [M, N], row rep*64 + w*16 + h*8 + r taken from row w*(M/4) + r*(M/32) + rep*2 + h (WIDE)."""
    # Lane 4r + c of warp w holds rows w*16 + r + {0, 8} of each 64-row wgmma (rep): now M/32 contiguous rows.
    x = tl.reshape(x, (4, 8, M // 64, 2, N))
    x = tl.permute(x, (2, 0, 3, 1, 4))
    return tl.reshape(x, (M, N))


@triton.jit
def _unperm_m(x, M: tl.constexpr, N: tl.constexpr):
    """The inverse of `_perm_m`: rows back in their memory order."""
    x = tl.reshape(x, (M // 64, 4, 2, 8, N))
    x = tl.permute(x, (1, 3, 0, 2, 4))
    return tl.reshape(x, (M, N))


@triton.jit
def _attend_decode(
    q, lo, hi, bt_ptr, kc_ptr, vc_ptr, kv_head, block_size,
    skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, qk_scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, F32_DOT: tl.constexpr, SWAP_AB: tl.constexpr, FP8_DOT: tl.constexpr,
    WIDE: tl.constexpr = False, PAGE_ROWS: tl.constexpr = 0,
):  # fmt: skip
    """Online softmax of the q rows [BLOCK_H, BLOCK_D] over keys [lo, hi); returns (acc, m, l), log2 units."""
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d < HEAD_DIM
    dv_ok = dv < HEAD_DIM_V
    # Per-row score scale: qk_scale (k_scale folded in by the caller) times q's e4m3 row scale with FP8_DOT.
    row_scale = tl.zeros((BLOCK_H,), dtype=tl.float32) + qk_scale
    if FP8_DOT:
        qf = q.to(tl.float32)
        amax = tl.max(tl.abs(qf), axis=1)
        q_sc = tl.where(amax > 0.0, amax / 448.0, 1.0)
        q = (qf / q_sc[:, None]).to(tl.float8e4nv)
        row_scale = row_scale * q_sc
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if SWAP_AB:
        # Row sums per key lane, reduced after the loop (module docstring).
        l_acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    # WIDE renumbers the head dims of q and every K tile alike (the scores are unchanged) and V^T's rows where
    # there are whole 64-row wgmmas of them.
    perm_k: tl.constexpr = WIDE and SWAP_AB and not FP8_DOT
    perm_v: tl.constexpr = perm_k and BLOCK_DV >= 64
    if perm_k:
        q = _perm_k(q, BLOCK_H, BLOCK_D)
    if SWAP_AB:
        q_t = tl.trans(q)  # [BLOCK_D, BLOCK_H]: loaded once, the B operand of every score dot
        acc = tl.zeros((BLOCK_DV, BLOCK_H), dtype=tl.float32)
    else:
        q_t = q
        acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        if PAGE_ROWS > 0:
            page, off = _tile_pages(bt_ptr, start, hi, BLOCK_N, PAGE_ROWS)
        else:
            off = k_pos % block_size
            page = tl.load(bt_ptr + k_pos // block_size, mask=k_ok, other=0).to(tl.int64)
        k = tl.load(kc_ptr + page[:, None] * skc_b + off[:, None] * skc_s + kv_head * skc_h + d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        if perm_k:
            k = _perm_k(k, BLOCK_N, BLOCK_D)
        if FP8_DOT:
            # Triton does not turn this V load into a pipelined async copy (with SWAP_AB, V^T reaches shared
            # memory through registers, transposed to K-major for the fp8 wgmma; compiled for sm_90a): issued
            # before the score dot, its latency overlaps the dot and the softmax. The converted variants load V
            # after the softmax: their V load is pipelined, and an early one kept the f16 tile live (161 vs
            # 135 registers for SWAP_AB, 64 x 4 warps, 3 stages).
            v = _load_v(vc_ptr, page, off, kv_head, svc_b, svc_s, svc_h, dv, k_ok, dv_ok, SWAP_AB)
        if not FP8_DOT and k.dtype.is_fp8():  # exact in bf16/fp16/fp32
            k = k.to(q.dtype)
        if SWAP_AB:
            # s^T [BLOCK_N, BLOCK_H]: one column per query row.
            if FP8_DOT:
                s = tl.dot(k, q_t)
            else:
                s = _mma(k, q_t, F32_DOT)
            rs = row_scale[None, :]
        else:
            if FP8_DOT:
                s = tl.dot(q, tl.trans(k))
            else:
                s = _mma(q, tl.trans(k), F32_DOT)
            rs = row_scale[:, None]
        if USE_SOFTCAP:
            # softcap * tanh(x / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1), as `_attend_range`.
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (s * rs) / softcap) + 1.0)) * _LOG2E
        else:
            s = s * (rs * _LOG2E)
        if SWAP_AB:
            s = tl.where(k_ok[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
        else:
            s = tl.where(k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing allowed yet keep m = -inf; shift by 0 there so no inf - inf appears.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        if SWAP_AB:
            p = tl.exp2(s - m_use[None, :])
            l_acc = l_acc * alpha[None, :] + p
        else:
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
        if not FP8_DOT:
            v = _load_v(vc_ptr, page, off, kv_head, svc_b, svc_s, svc_h, dv, k_ok, dv_ok, SWAP_AB)
            if perm_v:
                v = _perm_m(v, BLOCK_DV, BLOCK_N)
        if SWAP_AB:
            if FP8_DOT:
                pv = tl.dot(v, (p * _P_SCALE).to(tl.float8e4nv))
            else:
                if v.dtype.is_fp8():
                    v = v.to(q.dtype)
                pv = _mma(v, p.to(v.dtype), F32_DOT)
            acc = acc * alpha[None, :] + pv
        else:
            if FP8_DOT:
                pv = tl.dot((p * _P_SCALE).to(tl.float8e4nv), v)
            else:
                if v.dtype.is_fp8():
                    v = v.to(q.dtype)
                pv = _mma(p.to(v.dtype), v, F32_DOT)
            acc = acc * alpha[:, None] + pv
        m_i = m_new
    if SWAP_AB:
        l_i = tl.sum(l_acc, axis=0)
    if perm_v:
        acc = _unperm_m(acc, BLOCK_DV, BLOCK_H)
    if SWAP_AB:
        acc = tl.trans(acc)
    if FP8_DOT:
        acc = acc * (1.0 / _P_SCALE)
    return acc, m_i, l_i
