"""FP8 GEMMs on CUDA for fxllm::fp8_linear: torch._scaled_mm, and a Triton weight stream for small M.

`scaled_mm_linear`: x quantized per token (amax / 448, torch ops) then `torch._scaled_mm` with row-wise
scales (scale_a [M, 1], scale_b [1, N]; CUTLASS on H100), or per-tensor scales (cuBLASLt) when both the
weight and the activation scale are single values (a static input_scale). A per-tensor weight with
dynamic per-token activations is run row-wise with the weight scale broadcast to [1, N]. Bias is added
after the GEMM. _scaled_mm needs K and N multiples of 16 (`supports` checks; other shapes run the
reference) and has no 128 x 128 block scales in torch 2.11 (block weights run the reference).

`fp8_gemv_out`: for M <= GEMV_MAX_M the GEMM reads far more weight bytes than it computes with, and
DESIGN.md measured _scaled_mm at 34-50 us for Llama-3.1-8B's projections at M = 1 (slower than bf16):
each program streams BLOCK_N rows of the e4m3 weight once, quantizes its x tile to e4m3 in registers with
the row's scale (the same rounding as the reference), multiplies in float32 (e4m3 values are exact in
bf16, so tl.dot over bf16 operands is exact per product) and applies both scales at the end. No split-K:
deterministic, and N / BLOCK_N programs already fill 132 SMs on the 8B shapes. Launch sizes:
benchmarks/gpu_fp8.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxllm.quantization.fp8 import FP8_DTYPE, quantize_activation, weight_granularity

GEMV_MAX_M = 16
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit(do_not_specialize=["M"])
def _fp8_gemv_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, sx_m, sw_n, sy_m, ws_stride,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    xs = tl.load(xs_ptr + m, mask=m_ok, other=1.0)  # per-token scales [M] (float32)
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
        # The reference's activation quantization: e4m3(clamp(x / scale)), rounded to nearest even.
        xq = tl.clamp(x.to(tl.float32) / xs[:, None], -448.0, 448.0).to(tl.float8e4nv)
        if USE_DOT:
            acc += tl.dot(xq.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        else:
            acc += tl.sum(xq.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    ws = tl.load(ws_ptr + n * ws_stride, mask=n_ok, other=1.0)
    acc = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + m.to(tl.int64)[:, None] * sy_m + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemv_out(
    x: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, out: Tensor, *,
    block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:  # fmt: skip
    """out[M, N] = dequant(q(x)) @ dequant(weight)^T (+ bias) for M <= GEMV_MAX_M; x_scale [M] float32."""
    m, k = x.shape
    n = weight.shape[0]
    one_row = m == 1
    bk = block_k or 512
    _fp8_gemv_kernel[(triton.cdiv(n, block_n or 16),)](
        x, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0), 0 if weight_scale.numel() == 1 else 1,
        HAS_BIAS=bias is not None, USE_DOT=not one_row, EVEN_K=k % bk == 0,
        BLOCK_M=1 if one_row else GEMV_MAX_M, BLOCK_N=block_n or 16, BLOCK_K=bk,
        num_warps=num_warps or 4, num_stages=num_stages or 4,
    )  # fmt: skip


def supported(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor | None) -> bool:
    """Whether these operands take the GPU paths: e4m3 [N, K] weight, channel or tensor scales,
    K and N multiples of 16 (_scaled_mm's rule; 16-byte weight rows for the GEMV)."""
    if weight.dtype != FP8_DTYPE or weight.dim() != 2 or x.dtype not in _OUT_DTYPES:
        return False
    n, k = weight.shape
    if k % 16 or n % 16 or x.shape[-1] != k or weight.stride(1) != 1:
        return False
    try:
        return weight_granularity(weight, weight_scale) in ("channel", "tensor")
    except ValueError:
        return False


def scaled_mm_2d(
    x2: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor | None
) -> Tensor:
    """[M, K] -> [M, N] through torch._scaled_mm (row-wise, or per-tensor with a static input scale)."""
    xq, xs = quantize_activation(x2, input_scale)
    n = weight.shape[0]
    if input_scale is not None and weight_scale.numel() == 1:  # per-tensor x per-tensor: cuBLASLt
        scale_a, scale_b = xs.reshape(()), weight_scale.float().reshape(())
    else:  # row-wise: CUTLASS (scale_a [M, 1], scale_b [1, N])
        scale_a = xs.expand(x2.shape[0], 1).contiguous()
        scale_b = weight_scale.float().reshape(1, -1).expand(1, n).contiguous()
    y = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=x2.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def scaled_mm_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    input_scale: Tensor | None = None,
) -> Tensor:
    """fxllm::fp8_linear through torch._scaled_mm at every M."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))
    return scaled_mm_2d(x2, weight, weight_scale, bias, input_scale).view(*x.shape[:-1], weight.shape[0])


def fp8_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    input_scale: Tensor | None = None,
) -> Tensor:
    """fxllm::fp8_linear on CUDA: the Triton weight stream up to GEMV_MAX_M rows, _scaled_mm above."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if rows == 0 or rows > GEMV_MAX_M:
        return scaled_mm_linear(x, weight, weight_scale, bias, input_scale)
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    _, xs = quantize_activation(x2[:, :1] if input_scale is not None else x2, input_scale)
    x_scale = xs.reshape(-1).expand(rows).contiguous()
    out = torch.empty((rows, weight.shape[0]), dtype=x.dtype, device=x.device)
    fp8_gemv_out(x2, x_scale, weight, weight_scale.float().reshape(-1), bias, out)
    return out.view(*x.shape[:-1], weight.shape[0])
