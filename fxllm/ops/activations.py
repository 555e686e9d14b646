"""Gated MLP activations: `fxllm::silu_and_mul` (SwiGLU) and `fxllm::gelu_and_mul` (GeGLU).

Both take gate and up as two tensors of the same shape (often two slices of one merged GEMM's
output), so that no concatenation is needed to call them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxllm.ops.eager import eager_only
from fxllm.ops.registry import register_canonical_op


@eager_only
def _silu_and_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


@eager_only
def _gelu_and_mul_reference(gate: Tensor, up: Tensor, approximate: str) -> Tensor:
    return F.gelu(gate, approximate=approximate) * up


@torch.library.custom_op("fxllm::silu_and_mul", mutates_args=())
def silu_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up."""
    return _silu_and_mul_reference(gate, up).contiguous()


@silu_and_mul.register_fake
def _silu_and_mul_fake(gate, up):
    return (gate * up).contiguous()  # broadcasts like the reference, without torch.broadcast_shapes


@torch.library.custom_op("fxllm::gelu_and_mul", mutates_args=())
def gelu_and_mul(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate) * up."""
    return _gelu_and_mul_reference(gate, up, approximate).contiguous()


@gelu_and_mul.register_fake
def _gelu_and_mul_fake(gate, up, approximate="none"):
    return (gate * up).contiguous()  # broadcasts like the reference, without torch.broadcast_shapes


register_canonical_op("silu_and_mul", _silu_and_mul_reference, inline=True)
register_canonical_op("gelu_and_mul", _gelu_and_mul_reference, inline=True)
