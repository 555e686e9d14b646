"""`fxllm::fp8_linear`: a linear layer with an e4m3 weight and e4m3 activations, output in x's dtype.

Semantics (what every backend reproduces; fxllm/quantization/fp8.py has the arithmetic):
  1. x [..., K] is quantized to e4m3: per token with scale amax(|row|) / 448 (floored at 1/(448*512)), or
     with the static `input_scale` [1] when given; values clamp to +-448.
  2. weight [N, K] is e4m3 with `weight_scale` of shape [N, 1] (per output channel), [1] (per tensor) or
     [ceil(N/128), ceil(K/128)] (128 x 128 blocks).
  3. y = (q(x) * sx) @ (W * sw)^T computed in float32, + bias (in float32), cast to x's dtype.
The reference does exactly this in torch (dequantize, float32 matmul); GPU backends run the same
products on FP8 tensor cores with float32 accumulation, so they differ from it by summation order only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxllm.ops.registry import register_canonical_op
from fxllm.quantization.fp8 import dequantize_weight, quantize_activation


def fp8_linear_reference(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor | None
) -> Tensor:
    """Quantize x, dequantize both operands to float32, matmul, add bias, cast to x's dtype."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xq, xs = quantize_activation(x2, input_scale)
    y = (xq.float() * xs) @ dequantize_weight(weight, weight_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("fxllm::fp8_linear", mutates_args=())
def fp8_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    input_scale: Tensor | None = None,
) -> Tensor:
    """x @ dequant(weight)^T + bias with x quantized to e4m3 first; the output is contiguous, in x's dtype."""
    return fp8_linear_reference(x, weight, weight_scale, bias, input_scale).contiguous()


@fp8_linear.register_fake
def _fp8_linear_fake(x, weight, weight_scale, bias=None, input_scale=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Inline: the quantization and the dequantized matmul trace into ATen ops that Inductor fuses (it
# compiles the e4m3 casts on the CPU and GPU alike).
register_canonical_op("fp8_linear", fp8_linear_reference, inline=True)
