"""Triton RMSNorm kernels: drop-in CUDA implementations of `fxllm::rms_norm` / `fused_add_rms_norm`.

Each program normalises a [BLOCK_R, BLOCK_N] tile: BLOCK_R whole rows, so that small hidden sizes
(per-head q/k norms, N = 128) still give each program enough work. The row is held in registers,
one pass over memory. Rows may be strided (row stride is a kernel argument), the last dim must be
unit-stride (otherwise the wrapper copies). Numerics follow Hugging Face Llama exactly: normalise
in float32, round to x's dtype, multiply by the weight in float32, round to the result dtype.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxllm.ops.norms import rms_norm_reference

logger = logging.getLogger(__name__)

_MAX_BLOCK_N = 65536  # one row in registers; wider rows fall back to the reference


# `n_rows` changes every step: no variant per value class (1, multiples of 16), see paged_attention.py.
@triton.jit
def rms_norm_rows(
    x_ptr, r_ptr, w_ptr, sum_ptr, rows, cols, mask, n_cols, stride_x, stride_r, stride_sum, eps,
    HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """(x [+ residual, stored to sum_ptr]) RMS-normalised, times the weight: float32 [BLOCK_R, BLOCK_N]
    (the caller rounds it). Shared with the fused FP8 kernels (quant_fused.py), which must match it bit for bit."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # x + residual is rounded to its storage dtype first: the reference normalises the rounded sum.
        summed = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows[:, None] * stride_sum + cols[None, :], summed, mask=mask)
        xf = summed.to(tl.float32)
        in_dtype = sum_ptr.dtype.element_ty
    else:
        xf = x.to(tl.float32)
        in_dtype = x_ptr.dtype.element_ty
    var = tl.sum(xf * xf, axis=1) / n_cols
    normed = (xf * tl.rsqrt(var + eps)[:, None]).to(in_dtype)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0)
    return normed.to(tl.float32) * w.to(tl.float32)[None, :]


@triton.jit
def add_rms_norm_epilogue(
    acc, residual_ptr, weight_ptr, out_ptr, sum_ptr, offset, cols, mask, store_mask, n_cols, eps
):
    """A row's fp32 all-reduce sum `acc` -> + residual, RMSNorm, times weight: both outputs stored where
    `store_mask` (a part of the row `mask` covers), each rounded where the unfused path (all-reduce, then
    the Triton add + RMSNorm) rounds."""
    dtype = residual_ptr.dtype.element_ty
    reduced = acc.to(dtype).to(tl.float32)  # the all-reduce's result in the model's dtype, as unfused
    residual = tl.load(residual_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (reduced + residual).to(dtype)
    tl.store(sum_ptr + offset + cols, summed, mask=store_mask)
    xf = summed.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(var + eps)).to(dtype)
    w = tl.load(weight_ptr + cols, mask=store_mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + offset + cols, out.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    n_rows,
    n_cols,
    stride_x,
    stride_r,
    stride_out,
    stride_sum,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    out = rms_norm_rows(
        x_ptr,
        r_ptr,
        w_ptr,
        sum_ptr,
        rows,
        cols,
        mask,
        n_cols,
        stride_x,
        stride_r,
        stride_sum,
        eps,
        HAS_RESIDUAL,
    )
    tl.store(
        out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask
    )


def _as_rows(t: Tensor) -> Tensor:
    """A 2-D [rows, N] view of t with unit last stride, copying only if no such view exists."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dims not collapsible into one strided dim
        return t.reshape(-1, t.shape[-1])


def _launch_config(n_cols: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n_cols)
    # ~4K elements per program: enough bytes in flight per SM without spilling the row tile.
    block_r = max(1, min(64, 4096 // block_n))
    num_warps = 4 if block_n <= 2048 else 8 if block_n <= 8192 else 16
    return block_r, block_n, num_warps


def rms_norm_out(x: Tensor, weight: Tensor, eps: float, out: Tensor) -> None:
    """Write rms_norm(x, weight, eps) into `out` (same shape as x, any row stride)."""
    _launch(x, None, weight, eps, out, None)


def fused_add_rms_norm_out(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, out: Tensor, summed: Tensor
) -> None:
    """Write rms_norm(x + residual) into `out` and x + residual into `summed`."""
    _launch(x, residual, weight, eps, out, summed)


def _launch(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, out: Tensor, summed: Tensor | None
) -> None:
    n_cols = x.shape[-1]
    x2 = _as_rows(x)
    r2 = _as_rows(residual) if residual is not None else x2
    o2 = out.view(-1, n_cols)  # outputs are allocated by us: always viewable
    s2 = summed.view(-1, n_cols) if summed is not None else o2
    n_rows = x2.shape[0]
    if n_rows == 0:
        return
    block_r, block_n, num_warps = _launch_config(n_cols)
    _rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
        x2, r2, weight.contiguous(), o2, s2, n_rows, n_cols,
        x2.stride(0), r2.stride(0), o2.stride(0), s2.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip


def _supported(x: Tensor, weight: Tensor) -> bool:
    return (
        x.dim() >= 1
        and weight.shape == (x.shape[-1],)
        and triton.next_power_of_2(x.shape[-1]) <= _MAX_BLOCK_N
        and x.dtype.is_floating_point
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Triton RMSNorm over the last dimension (HF Llama order of operations)."""
    if not _supported(x, weight):
        return rms_norm_reference(x, weight, eps).contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rms_norm_out(x, weight, eps, out)
    return out


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Triton (rms_norm(x + residual), x + residual) in one pass over memory."""
    if residual.shape != x.shape or not _supported(x, weight):
        summed = (x + residual).contiguous()
        return rms_norm_reference(summed, weight, eps).contiguous(), summed
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    summed = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    fused_add_rms_norm_out(x, residual, weight, eps, out, summed)
    return out, summed
