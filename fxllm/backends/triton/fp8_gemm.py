"""CUDA backends of fxllm::fp8_gemm (the GEMM of an FP8 linear; its activation is quantized in ATen in
front, fxllm/ops/fp8_gemm.py): `torch._scaled_mm`, and the Triton weight stream of gemv.py.

`scaled_mm_gemm` ("scaled_mm": float32-promoted accumulation; runs where compile.op_backends names it), per
call on the operands:
  * both scales single values (a per-tensor weight at M = 1, or a static input scale): cuBLASLt per-tensor,
    output in out_dtype directly;
  * M = 1 (one row: its per-token scale is a per-tensor one) with channel scales, or out_dtype not
    bfloat16 (torch's row-wise path writes bfloat16 only): cuBLASLt per-tensor with the activation scale and a
    unit weight scale into float32, then x the channel scales (+ bias) and one cast. On the H100 the bare
    per-tensor GEMM took 8.1 / 5.9 / 42.0 / 25.5 us at M = 1 on Llama-3.1-8B's qkv / o / gate_up / down
    against 17.2 / 14.9 / 49.9 / 47.4 row-wise and 12.6 / 10.4 / 52.7 / 43.7 for the Triton stream
    (benchmarks/RESULTS.md, "FP8 GEMMs"); the epilogue is one small elementwise kernel (N values).
  * otherwise row-wise (CUTLASS in torch's own kernel; on the H200 with torch 2.11 the profile shows
    cuBLASLt's outer-vector-scaled `nvjet_*_ovscale` kernels): scale_a [M, 1], scale_b [1, N] float32,
    weight as [K, N] column-major (weight.t() of the row-major [N, K]), bfloat16 out; equal to per-tensor
    at M = 2048 (93.5 vs 90.3 us).
  _scaled_mm needs K and N multiples of 16 (`supported_by_scaled_mm`).
`scaled_mm_fast_accum_gemm` ("scaled_mm_fast_accum"): the same cases with `use_fast_accum=True`: the FP8
tensor-core partial sums are not promoted to float32 registers every few K steps (cuBLASLt's fast
accumulation; CUTLASS's FP8FastAccum schedules, the ones vLLM's FP8 CUTLASS GEMMs use): the lowering's
default wherever _scaled_mm takes the shape. On the H200 (torch 2.11, benchmarks/RESULTS.md, nineteenth
session) row-wise fast accumulation took Llama-3.1-8B's gate_up at M = 1,024 / 2,048 / 8,192 from 211 / 415 /
1,699 us to 193 / 381 / 1,432 and qkv from 47 / 91 / 352 to 41 / 80 / 330; the down projection
(K = 14,336) read 6-9% slower bare and 2-8% faster through these backends, so until the twentieth session it
kept plain accumulation. The engine decided it (twentieth session, one call, alternated): the 8B FP8 engine at
1,000 x 128/128 ran 28,741 tok/s with down on plain accumulation and 29,160 (+1.5%) with fast accumulation on
every GEMM. Its GEMMs are 2.4e-3 (K = 4,096) to 3.7e-3 (K = 14,336) from the float32-accumulated reference,
against 7e-4 without: beside the activations' e4m3 rounding (1.5e-2 for the whole FP8 linear) this moved the
2-layer FP8 logits from bf16's by 0.1417 -> 0.1418 relative.
`triton_gemm` ("triton"): gemv.py's kernel with FP8 on, any M, any K and N: the lowering picks it for nodes
_scaled_mm cannot take (K or N not a multiple of 16); name it in compile.op_backends to compare. It lost to
_scaled_mm at every measured M (12.6 vs 8.1 us at M = 1, 59.3 vs 18.3 us at M = 16 on qkv).
Neither takes 128 x 128 block scales (none in torch 2.11's _scaled_mm): those nodes run the reference.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from fxllm.backends.triton.gemv import launch_gemv
from fxllm.quantization.fp8 import FP8_DTYPE, weight_granularity

logger = logging.getLogger(__name__)

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_UNIT: dict[torch.device, Tensor] = {}  # a 0-dim float32 1.0 per device: the unit scale_b


def supported(xq: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, out_dtype: object) -> bool:
    """Whether the Triton path takes these operands: e4m3 x and [N, K] weight, channel or tensor scales,
    a per-token or per-tensor activation scale, a float out_dtype."""
    if (
        xq.dtype != FP8_DTYPE
        or weight.dtype != FP8_DTYPE
        or weight.dim() != 2
        or out_dtype not in _OUT_DTYPES
    ):
        return False
    if xq.shape[-1] != weight.shape[1] or weight.stride(1) != 1:
        return False
    # Per token ([..., 1], as the quantization's amax keeps its dim) or one static value. Only the static
    # sizes are compared: M is symbolic in the lowering, and comparing it would add a guard.
    per_token = x_scale.dim() == xq.dim() and x_scale.shape[-1] == 1
    static = all(isinstance(d, int) and d == 1 for d in x_scale.shape)  # [1], or [1, 1] as quantized
    if not (per_token or static):
        return False
    try:
        return weight_granularity(weight, weight_scale) in ("channel", "tensor")
    except ValueError:
        return False


def supported_by_scaled_mm(
    xq: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, out_dtype: object
) -> bool:
    """`supported`, and K and N multiples of 16 (_scaled_mm's rule)."""
    n, k = weight.shape if weight.dim() == 2 else (1, 1)
    return supported(xq, x_scale, weight, weight_scale, out_dtype) and k % 16 == 0 and n % 16 == 0


def _rows(xq: Tensor) -> Tensor:
    x2 = xq.reshape(-1, xq.shape[-1])
    return x2 if x2.stride(-1) == 1 and (x2.shape[0] <= 1 or x2.stride(0) == x2.shape[1]) else x2.contiguous()


def _unit(device: torch.device) -> Tensor:
    """A cached 0-dim 1.0 on `device`. Made on the first eager call (the engine warms up before it captures
    CUDA graphs); made during a capture it would hold its value only after the graph's first replay."""
    one = _UNIT.get(device)
    if one is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fp8_gemm: first call inside a CUDA graph capture; run one eager call first")
        one = _UNIT[device] = torch.ones((), dtype=torch.float32, device=device)
    return one


def scaled_mm_2d(
    x2: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> Tensor:
    """[M, K] e4m3 -> [M, N] out_dtype through torch._scaled_mm (the cases of the module docstring)."""
    m, n = x2.shape[0], weight.shape[0]
    xs, ws = x_scale.float(), weight_scale.float()
    per_tensor_x = xs.numel() == 1
    if per_tensor_x and ws.numel() == 1 and bias is None:  # cuBLASLt per-tensor, scales in its epilogue
        return torch._scaled_mm(
            x2,
            weight.t(),
            scale_a=xs.reshape(()),
            scale_b=ws.reshape(()),
            out_dtype=out_dtype,
            use_fast_accum=fast_accum,
        )
    if (per_tensor_x and m == 1) or out_dtype != torch.bfloat16:
        # Per-tensor GEMM into float32, then the remaining scales (+ bias) and the cast in one kernel each.
        unit = _unit(x2.device)
        scale_a = xs.reshape(()) if per_tensor_x else unit
        scale_b = ws.reshape(()) if ws.numel() == 1 else unit
        y = torch._scaled_mm(
            x2,
            weight.t(),
            scale_a=scale_a,
            scale_b=scale_b,
            out_dtype=torch.float32,
            use_fast_accum=fast_accum,
        )
        if not per_tensor_x:
            y.mul_(xs.reshape(m, 1))
        out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
        ws_row = ws.reshape(1, -1) if ws.numel() != 1 else None
        if bias is None:
            return out.copy_(y) if ws_row is None else torch.mul(y, ws_row, out=out)
        if ws_row is None:
            return torch.add(y, bias.float(), out=out)
        return torch.addcmul(bias.float(), y, ws_row, out=out)  # bias + y * ws in float32, cast once
    # Row-wise (CUTLASS or cuBLASLt, the module docstring): scale_a [M, 1] and scale_b [1, N] float32
    # contiguous (views, no copies here), bfloat16 out; a bias goes into its epilogue (added in float32
    # before the one rounding to bfloat16).
    scale_a = xs.reshape(-1, 1).expand(m, 1).contiguous()  # a static [1] scale: one per row
    scale_b = ws.reshape(1, -1).expand(1, n).contiguous()
    bias = None if bias is None else bias.to(out_dtype)
    return torch._scaled_mm(
        x2,
        weight.t(),
        scale_a=scale_a,
        scale_b=scale_b,
        bias=bias,
        out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )


def scaled_mm_gemm(
    xq: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> Tensor:
    """fxllm::fp8_gemm through torch._scaled_mm (`fast_accum`: use_fast_accum, no periodic float32
    promotion)."""
    n = weight.shape[0]
    x2 = _rows(xq)
    if x2.shape[0] == 0:
        return torch.empty((*xq.shape[:-1], n), dtype=out_dtype, device=xq.device)
    return scaled_mm_2d(x2, x_scale, weight, weight_scale, bias, out_dtype, fast_accum).view(
        *xq.shape[:-1], n
    )


# The "scaled_mm_fast_accum" backend: the same op with fast accumulation (the module docstring says where).
scaled_mm_fast_accum_gemm = functools.partial(scaled_mm_gemm, fast_accum=True)


def triton_gemm(
    xq: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """fxllm::fp8_gemm through the Triton weight stream (gemv.py's kernel, FP8 on), at any M."""
    n = weight.shape[0]
    x2 = _rows(xq)
    out = torch.empty((x2.shape[0], n), dtype=out_dtype, device=xq.device)
    if x2.shape[0]:
        xs = x_scale.float().reshape(-1)
        launch_gemv(x2, weight, bias, out, xs, weight_scale.float().reshape(-1))
    return out.view(*xq.shape[:-1], n)
