"""Gated MLP activations: `fxllm::silu_and_mul` (SwiGLU) and `fxllm::gelu_and_mul` (GeGLU).

Both take gate and up as two tensors of the same shape (often two slices of one merged GEMM's
output), so that no concatenation is needed to call them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.custom_op("fxllm::silu_and_mul", mutates_args=())
def silu_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


@silu_and_mul.register_fake
def _silu_and_mul_fake(gate, up):
    return gate.new_empty(torch.broadcast_shapes(gate.shape, up.shape))


@torch.library.custom_op("fxllm::gelu_and_mul", mutates_args=())
def gelu_and_mul(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate) * up."""
    return F.gelu(gate, approximate=approximate) * up


@gelu_and_mul.register_fake
def _gelu_and_mul_fake(gate, up, approximate="none"):
    return gate.new_empty(torch.broadcast_shapes(gate.shape, up.shape))
