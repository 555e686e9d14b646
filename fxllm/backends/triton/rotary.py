"""Triton rotate-half (NeoX) RoPE: drop-in CUDA implementation of `fxllm::rotary_embedding`.

q and k are taken as 4-D [B, H, T, D] with arbitrary strides on every dim (the transposed views
Hugging Face attention produces work without a copy); cos and sin are expanded to q's shape
(stride-0 broadcast, no copy). One program per (b, t) rotates every head of q and then of k in
[BLOCK_H, D/2] tiles, so cos/sin for that position are read once. Outputs are contiguous, as the op's
fake declares: Inductor asserts a bound kernel's output strides against the fake. Math in float32,
one rounding at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxllm.ops.rotary import rotary_embedding_reference


@triton.jit
def _rope_heads(
    x_ptr,
    o_ptr,
    c1,
    c2,
    s1,
    s2,
    b,
    t,
    n_heads,
    sx_b,
    sx_h,
    sx_t,
    sx_d,
    so_b,
    so_h,
    so_t,
    so_d,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & dmask[None, :]
        xb = x_ptr + b * sx_b + t * sx_t + h[:, None] * sx_h + d[None, :] * sx_d
        x1 = tl.load(xb, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xb + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
        # rotate_half(x) = [-x2, x1]: out1 = x1*cos1 - x2*sin1, out2 = x2*cos2 + x1*sin2.
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        ob = o_ptr + b * so_b + t * so_t + h[:, None] * so_h + d[None, :] * so_d
        tl.store(ob, o1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(ob + HALF * so_d, o2.to(o_ptr.dtype.element_ty), mask=mask)


# `seq_len` changes every step: no variant per value class (1, multiples of 16), see paged_attention.py.
@triton.jit(do_not_specialize=["seq_len"])
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    seq_len, hq, hk,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sc_b, sc_t, sc_d,
    ss_b, ss_t, ss_d,
    sqo_b, sqo_h, sqo_t, sqo_d,
    sko_b, sko_h, sko_t, sko_d,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cb = cos_ptr + b * sc_b + t * sc_t + d * sc_d
    sb = sin_ptr + b * ss_b + t * ss_t + d * ss_d
    # cos/sin of both halves (they are equal for standard RoPE tables, but the op allows any table).
    c1 = tl.load(cb, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cb + HALF * sc_d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sb, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sb + HALF * ss_d, mask=dmask, other=0.0).to(tl.float32)
    _rope_heads(q_ptr, qo_ptr, c1, c2, s1, s2, b, t, hq, sq_b, sq_h, sq_t, sq_d,
                sqo_b, sqo_h, sqo_t, sqo_d, HALF, BLOCK_H, BLOCK_D)  # fmt: skip
    _rope_heads(k_ptr, ko_ptr, c1, c2, s1, s2, b, t, hk, sk_b, sk_h, sk_t, sk_d,
                sko_b, sko_h, sko_t, sko_d, HALF, BLOCK_H, BLOCK_D)  # fmt: skip


def _fits(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Shapes the kernel handles: 4-D q/k with equal B, T, D; even D; cos/sin broadcast to q and k."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or cos.shape != sin.shape:
        return False
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        return False
    return (
        _broadcasts_to(cos.shape, q.shape)
        and _broadcasts_to(cos.shape, k.shape)
        and (cos.dim() < 3 or cos.shape[-3] == 1)  # cos must not vary over heads
    )


def _broadcasts_to(small: torch.Size, shape: torch.Size) -> bool:
    """Whether `small` broadcasts to `shape` unchanged; torch.broadcast_shapes took ~0.2 ms a call (H100
    host), twice per RoPE call: most of a prefill step's host time at 32 layers (cProfile, RESULTS.md)."""
    if len(small) > len(shape):
        return False
    return all(s == 1 or s == d for s, d in zip(reversed(small), reversed(shape)))


def _broadcast4(t: Tensor, bsz: int, seq_len: int, dim: int) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.expand(bsz, 1, seq_len, dim)


def rotary_embedding_out(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_out: Tensor, k_out: Tensor
) -> None:
    """Write RoPE(q), RoPE(k) into q_out, k_out (any strides)."""
    bsz, hq, seq_len, dim = q.shape
    hk = k.shape[1]
    if bsz * seq_len == 0:
        return
    # Broadcast cos/sin to [B, 1, T, D] with stride-0 dims: a view, no copy.
    c, s = (_broadcast4(t, bsz, seq_len, dim) for t in (cos, sin))
    half = dim // 2
    block_d = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(hq, hk)), 2048 // block_d))
    _rope_kernel[(bsz * seq_len,)](
        q, k, c, s, q_out, k_out, seq_len, hq, hk,
        *q.stride(), *k.stride(),
        c.stride(0), c.stride(2), c.stride(3),
        s.stride(0), s.stride(2), s.stride(3),
        *q_out.stride(), *k_out.stride(),
        HALF=half, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


def rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Triton rotate-half RoPE on q and k; strided q/k are read in-kernel, outputs are contiguous."""
    if not _fits(q, k, cos, sin):
        q_ref, k_ref = rotary_embedding_reference(q, k, cos, sin)
        return q_ref.contiguous(), k_ref.contiguous()
    # Contiguous, as the op's fake says: Inductor asserts a bound kernel's output strides against it.
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
    rotary_embedding_out(q, k, cos, sin, q_out, k_out)
    return q_out, k_out
