"""Triton GEMV for decode-sized M: y[M, N] = x[M, K] @ W[N, K]^T (+ b), streaming W once.

At M <= GEMV_MAX_M a GEMM reads far more weight bytes than it does work with them, so the kernel is
a weight stream: program n owns BLOCK_N output features and walks K in BLOCK_K tiles, loading each
row of W as contiguous 16-byte vectors, with num_stages tiles in flight. No split-K: Llama-3.1-8B's
smallest projection (N = 4096) already gives 4096 / BLOCK_N programs, several waves of 132 SMs, and
the output stays deterministic. Rows of x beyond M are masked, so one compiled kernel serves every
M up to BLOCK_M (`do_not_specialize`: the decode buckets capture without recompiling). Larger M goes
to F.linear (cuBLAS). Launch sizes: benchmarks/gpu_gemv.py sweeps them against torch.mm.
The same kernel, with its FP8 switch, is the FP8 GEMM's Triton path (fp8_gemm.py): e4m3 operands
and their scales; there it also takes M > GEMV_MAX_M (a second grid axis over blocks of rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

GEMV_MAX_M = 16
_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, xs_ptr, ws_ptr, M, N, K, sx_m, sw_n, sy_m, xs_stride, ws_stride,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # FP8: x and w are e4m3 with float32 scales xs (per row of x, or one: xs_stride 0) and ws (per row of
    # w, or one). e4m3 values are exact in bfloat16, so the products are exact either way; both scales
    # are applied once to the float32 sum. Otherwise xs_ptr / ws_ptr are unused.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    w_rows = w_ptr + n.to(tl.int64)[:, None] * sw_n
    x_rows = x_ptr + m.to(tl.int64)[:, None] * sx_m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0)
        else:
            k_ok = k < K
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            if FP8:
                acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
            else:
                acc += tl.dot(x, tl.trans(w))
        else:
            # One row of x (BLOCK_M == 1): a float32 multiply-and-reduce, no tensor-core padding.
            acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    if FP8:
        xs = tl.load(xs_ptr + m * xs_stride, mask=m_ok, other=1.0)
        ws = tl.load(ws_ptr + n * ws_stride, mask=n_ok, other=1.0)
        acc = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + m.to(tl.int64)[:, None] * sy_m + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def launch_gemv(
    x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, x_scale: Tensor | None = None,
    weight_scale: Tensor | None = None, *, block_n: int | None = None, block_k: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> None:  # fmt: skip
    """out[M, N] = x[M, K] @ weight[N, K]^T (+ bias); with both scales (1-D float32, one value or one
    per row) x and weight are e4m3 and the sum is scaled by x_scale[m] * weight_scale[n]. Any M: rows
    go in blocks of GEMV_MAX_M (one row alone when M == 1); launch sizes overridable."""
    m, k = x.shape
    n = weight.shape[0]
    fp8 = x_scale is not None
    if fp8 != (weight_scale is not None):
        raise ValueError("launch_gemv: give both x_scale and weight_scale (FP8) or neither")
    one_row = m == 1
    block_m = 1 if one_row else GEMV_MAX_M
    bk, bn = block_k or 512, block_n or 16
    xs = x_scale if x_scale is not None else out
    ws = weight_scale if weight_scale is not None else out
    _gemv_kernel[(triton.cdiv(n, bn), triton.cdiv(m, block_m))](
        x, weight, bias if bias is not None else out, out, xs, ws, m, n, k, x.stride(0), weight.stride(0),
        out.stride(0), 0 if xs.numel() == 1 else 1, 0 if ws.numel() == 1 else 1,
        HAS_BIAS=bias is not None, USE_DOT=not one_row, EVEN_K=k % bk == 0, FP8=fp8,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps or 4, num_stages=num_stages or 4,
    )  # fmt: skip


def gemv_out(
    x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, *, block_n: int | None = None,
    block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
) -> None:  # fmt: skip
    """out[M, N] = x[M, K] @ weight[N, K]^T (+ bias) with M <= GEMV_MAX_M; launch sizes overridable."""
    launch_gemv(x, weight, bias, out, block_n=block_n, block_k=block_k, num_warps=num_warps,
                num_stages=num_stages)  # fmt: skip


def supported(x: Tensor, weight: Tensor) -> bool:
    """Whether the GEMV takes these operands (else `linear` calls F.linear)."""
    return (
        x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and x.shape[-1] == weight.shape[1]
        and weight.shape[1] % 8 == 0  # 16-byte rows: the vector loads stay aligned
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """fxllm::linear on CUDA: the GEMV up to GEMV_MAX_M rows, cuBLAS (F.linear) above."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0 or rows > GEMV_MAX_M or not supported(x, weight):
        return F.linear(x, weight, bias).contiguous()
    x2 = x.reshape(rows, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((rows, weight.shape[0]), dtype=x.dtype, device=x.device)
    gemv_out(x2, weight, bias, out)
    return out.view(*x.shape[:-1], weight.shape[0])
