"""Producers with the FP8 activation quantization fused in: `fxllm::fused_add_rms_norm_fp8`,
`fxllm::rms_norm_fp8`, `fxllm::silu_and_mul_fp8` and `fxllm::gelu_and_mul_fp8`.

Each is its unquantized op followed by `quantize_activation` (fxllm/quantization/fp8.py), per token:
  fused_add_rms_norm_fp8(x, residual, weight, eps) -> (q, scale, x + residual)
      q, scale = quantize_activation(rms_norm(x + residual, weight, eps))
  rms_norm_fp8(x, weight, eps) -> (q, scale)
      q, scale = quantize_activation(rms_norm(x, weight, eps))
  silu_and_mul_fp8(gate, up) -> (q, scale)
      q, scale = quantize_activation(silu(gate) * up)
  gelu_and_mul_fp8(gate, up, approximate) -> (q, scale)
      q, scale = quantize_activation(gelu(gate, approximate) * up)
q is e4m3 with the unquantized output's shape, scale float32 [..., 1] (amax(|row|) / 448, floored at
1 / (448 * 512)); the normed / activated row is rounded to its own dtype (promote of the inputs, as the
unfused op returns it) before its amax is taken, so the pair is what the unfused op + quantization give.
The pass fuse_fp8_quant (fxllm/passes/fuse_fp8_quant.py) emits them in front of `fxllm::fp8_gemm`.
Without a backend (the CPU) the reference is inlined: the same ATen ops as the unfused path, so Inductor
compiles exactly what it compiled before. The Triton kernels: fxllm/backends/triton/quant_fused.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxllm.ops.eager import eager_only
from fxllm.ops.norms import fused_add_rms_norm_reference, rms_norm_reference
from fxllm.ops.registry import register_canonical_op
from fxllm.quantization.fp8 import FP8_DTYPE, quantize_activation


@eager_only
def fused_add_rms_norm_fp8_reference(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Plain-torch (e4m3 rms_norm(x + residual), its per-token scale, x + residual)."""
    normed, summed = fused_add_rms_norm_reference.__wrapped__(x, residual, weight, eps)  # type: ignore[attr-defined]
    q, scale = quantize_activation(normed)
    return q, scale, summed


@eager_only
def rms_norm_fp8_reference(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Plain-torch (e4m3 rms_norm(x), its per-token scale)."""
    return quantize_activation(rms_norm_reference.__wrapped__(x, weight, eps))  # type: ignore[attr-defined]


@eager_only
def silu_and_mul_fp8_reference(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Plain-torch (e4m3 silu(gate) * up, its per-token scale)."""
    return quantize_activation(F.silu(gate) * up)


@eager_only
def gelu_and_mul_fp8_reference(gate: Tensor, up: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    """Plain-torch (e4m3 gelu(gate, approximate) * up, its per-token scale)."""
    return quantize_activation(F.gelu(gate, approximate=approximate) * up)


def _quant_fakes(like: Tensor) -> tuple[Tensor, Tensor]:
    return like.new_empty(like.shape, dtype=FP8_DTYPE), like.new_empty(
        (*like.shape[:-1], 1), dtype=torch.float32
    )


@torch.library.custom_op("fxllm::fused_add_rms_norm_fp8", mutates_args=())
def fused_add_rms_norm_fp8(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(e4m3 rms_norm(x + residual), float32 per-token scale [..., 1], x + residual); all contiguous."""
    q, scale, summed = fused_add_rms_norm_fp8_reference(x, residual, weight, eps)
    return q.contiguous(), scale.contiguous(), summed.contiguous()


@fused_add_rms_norm_fp8.register_fake
def _fused_add_rms_norm_fp8_fake(x, residual, weight, eps):
    summed = (x + residual).contiguous()  # the real op's device, dtype promotion and shape
    return (*_quant_fakes(summed), summed)


@torch.library.custom_op("fxllm::rms_norm_fp8", mutates_args=())
def rms_norm_fp8(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(e4m3 rms_norm(x), float32 per-token scale [..., 1]); both contiguous."""
    q, scale = rms_norm_fp8_reference(x, weight, eps)
    return q.contiguous(), scale.contiguous()


@rms_norm_fp8.register_fake
def _rms_norm_fp8_fake(x, weight, eps):
    return _quant_fakes(x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)))


@torch.library.custom_op("fxllm::silu_and_mul_fp8", mutates_args=())
def silu_and_mul_fp8(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(e4m3 silu(gate) * up, float32 per-token scale [..., 1]); both contiguous."""
    q, scale = silu_and_mul_fp8_reference(gate, up)
    return q.contiguous(), scale.contiguous()


@silu_and_mul_fp8.register_fake
def _silu_and_mul_fp8_fake(gate, up):
    return _quant_fakes(gate * up)


register_canonical_op("fused_add_rms_norm_fp8", fused_add_rms_norm_fp8_reference, inline=True)


@torch.library.custom_op("fxllm::gelu_and_mul_fp8", mutates_args=())
def gelu_and_mul_fp8(gate: Tensor, up: Tensor, approximate: str = "none") -> tuple[Tensor, Tensor]:
    """(e4m3 gelu(gate, approximate) * up, float32 per-token scale [..., 1]); both contiguous."""
    q, scale = gelu_and_mul_fp8_reference(gate, up, approximate)
    return q.contiguous(), scale.contiguous()


@gelu_and_mul_fp8.register_fake
def _gelu_and_mul_fp8_fake(gate, up, approximate="none"):
    return _quant_fakes(gate * up)


register_canonical_op("gelu_and_mul_fp8", gelu_and_mul_fp8_reference, inline=True)
register_canonical_op("rms_norm_fp8", rms_norm_fp8_reference, inline=True)
register_canonical_op("silu_and_mul_fp8", silu_and_mul_fp8_reference, inline=True)
