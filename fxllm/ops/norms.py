"""RMSNorm ops: `fxllm::rms_norm` and `fxllm::fused_add_rms_norm`.

The reference follows Hugging Face's Llama RMSNorm exactly: normalise in float32, cast back to the
input dtype, then multiply by the weight. Models that scale by (1 + weight) (Gemma) get the
offset folded into the weight by the matching pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxllm.ops.eager import eager_only
from fxllm.ops.registry import register_canonical_op


@eager_only
def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Plain-torch RMSNorm in Hugging Face Llama's order of operations."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@torch.library.custom_op("fxllm::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension; the output is contiguous."""
    return rms_norm_reference(x, weight, eps).contiguous()


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))  # contiguous


@torch.library.custom_op("fxllm::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Returns (rms_norm(x + residual), x + residual): one pass instead of two."""
    summed = (x + residual).contiguous()
    return rms_norm_reference(summed, weight, eps).contiguous(), summed


@fused_add_rms_norm.register_fake
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    summed = (x + residual).contiguous()  # same device, dtype promotion and shape as the real op
    return summed.new_empty(summed.shape, dtype=torch.promote_types(summed.dtype, weight.dtype)), summed


@eager_only
def fused_add_rms_norm_reference(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Plain-torch (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm_reference.__wrapped__(summed, weight, eps), summed  # type: ignore[attr-defined]


register_canonical_op("rms_norm", rms_norm_reference, inline=True)
register_canonical_op("fused_add_rms_norm", fused_add_rms_norm_reference, inline=True)
