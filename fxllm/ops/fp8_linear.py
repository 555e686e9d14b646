"""`fxllm::fp8_linear`: a linear layer with an e4m3 weight and e4m3 activations, output in x's dtype.

Semantics (what every backend reproduces; fxllm/quantization/fp8.py has the arithmetic):
  1. x [..., K] is quantized to e4m3: per token with scale amax(|row|) / 448 (floored at 1/(448*512)), per
     tensor (one dynamic scale over all of x) when `per_tensor` is set, or with the static `input_scale` [1]
     when given (it wins over `per_tensor`); values clamp to +-448. `per_tensor` is an argument of the op,
     not a module attribute, so that it survives capture, merging and `--explain` (a checkpoint may mix
     schemes per layer).
  2. weight [N, K] is e4m3 with `weight_scale` of shape [N, 1] (per output channel), [1] (per tensor) or
     [ceil(N/128), ceil(K/128)] (128 x 128 blocks).
  3. y = (q(x) * sx) @ (W * sw)^T computed in float32, + bias (in float32), cast to x's dtype.
The quantize pass does not emit this op: it splits every FP8 linear into the activation quantization in
ATen and `fxllm::fp8_gemm` (fxllm/ops/fp8_gemm.py), so that Inductor fuses the quantization into the
producer; it also splits any fp8_linear node another pass or loader put into the graph. The op stays as
the whole layer's definition (and for graphs built by hand); its reference is exactly those two steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxllm.ops.fp8_gemm import fp8_gemm_reference
from fxllm.ops.registry import register_canonical_op
from fxllm.quantization.fp8 import quantize_activation, quantize_activation_tensor


def fp8_linear_reference(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    per_tensor: bool = False,
) -> Tensor:
    """Quantize x (per token, per tensor, or with the static input_scale), then fp8_gemm's reference."""
    if per_tensor and input_scale is None:
        xq, xs = quantize_activation_tensor(x)
    else:
        xq, xs = quantize_activation(x, input_scale)
    return fp8_gemm_reference(xq, xs, weight, weight_scale, bias, x.dtype)


@torch.library.custom_op("fxllm::fp8_linear", mutates_args=())
def fp8_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    input_scale: Tensor | None = None,
    per_tensor: bool = False,
) -> Tensor:
    """x @ dequant(weight)^T + bias with x quantized to e4m3 first; the output is contiguous, in x's dtype."""
    return fp8_linear_reference(x, weight, weight_scale, bias, input_scale, per_tensor).contiguous()


@fp8_linear.register_fake
def _fp8_linear_fake(x, weight, weight_scale, bias=None, input_scale=None, per_tensor=False):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Inline: the quantization and the dequantized matmul trace into ATen ops that Inductor fuses (it
# compiles the e4m3 casts on the CPU and GPU alike).
register_canonical_op("fp8_linear", fp8_linear_reference, inline=True)
