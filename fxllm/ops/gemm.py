"""`fxllm::linear`: y = x W^T + b for a constant weight, as an op the lowering can choose a kernel for.

The `linear_ops` pass rewrites constant-weight `aten.linear` nodes into it on CUDA, where the best
kernel depends on how many rows x has: cuBLAS for prefill-sized M, a weight-streaming GEMV for
decode-sized M (cuBLAS reaches 1.1-1.9 TB/s on Llama-3.1-8B's small projections at M = 1; DESIGN.md).
The reference is F.linear, inlined by the lowering wherever no other implementation is chosen, so a
graph without the Triton backend is the graph it was before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxllm.ops.registry import register_canonical_op


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear."""
    return F.linear(x, weight, bias)


@torch.library.custom_op("fxllm::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight^T + bias; the output is contiguous."""
    return linear_reference(x, weight, bias).contiguous()


@linear.register_fake
def _linear_fake(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


register_canonical_op("linear", linear_reference, inline=True)
