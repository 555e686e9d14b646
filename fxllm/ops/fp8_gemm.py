"""`fxllm::fp8_gemm`: the GEMM of an FP8 linear layer, over an activation already quantized to e4m3.

The quantize pass (fxllm/passes/quantize_fp8.py) puts the activation quantization in front of it as
ATen ops (quantize_activation's arithmetic), so Inductor fuses it into the kernel that produces the
activation (RMSNorm, SiLU-and-mul, the attention output), and this op is the GEMM alone.

Semantics (what every backend reproduces):
  xq [..., K] e4m3 with x_scale [..., 1] (per token) or [1] (per tensor), float32;
  weight [N, K] e4m3 with weight_scale [N, 1] (channel), [1] (tensor) or [ceil(N/128), ceil(K/128)] (block);
  y = (xq * x_scale) @ (weight * weight_scale)^T in float32, + bias (in float32), cast to out_dtype.
quantize_activation followed by this reference is, operation for operation, the old whole-op reference
(`fp8_linear_reference`). GPU backends (fxllm/backends/triton/fp8_gemm.py) form the same e4m3 x e4m3
products in float32 and differ from it by summation order and where the scales are applied.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxllm.ops.registry import register_canonical_op
from fxllm.quantization.fp8 import dequantize_weight


def fp8_gemm_reference(
    xq: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Dequantize both e4m3 operands to float32, matmul, add bias, cast to out_dtype."""
    k = xq.shape[-1]
    x2 = xq.reshape(-1, k)
    y = (x2.float() * x_scale.float().reshape(-1, 1)) @ dequantize_weight(weight, weight_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*xq.shape[:-1], weight.shape[0])


@torch.library.custom_op("fxllm::fp8_gemm", mutates_args=())
def fp8_gemm(
    xq: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """dequant(xq) @ dequant(weight)^T + bias in float32, cast to out_dtype; the output is contiguous."""
    return fp8_gemm_reference(xq, x_scale, weight, weight_scale, bias, out_dtype).contiguous()


@fp8_gemm.register_fake
def _fp8_gemm_fake(xq, x_scale, weight, weight_scale, bias, out_dtype):
    return xq.new_empty((*xq.shape[:-1], weight.shape[0]), dtype=out_dtype)


# Inline where no backend takes a node (the CPU): the dequantized matmul traces into ATen ops that
# Inductor compiles, e4m3 casts included.
register_canonical_op("fp8_gemm", fp8_gemm_reference, inline=True)
