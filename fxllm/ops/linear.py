"""`fxllm::packed_linear`: a linear layer whose weight is stored in blocks of 16 output features.

The layout is the one a CPU GEMM streams best: for each block of 16 output rows, the K input
columns come one after the other, each holding the block's 16 weights (float32: [N/16, K, 16]).
bfloat16 keeps pairs of neighbouring inputs together ([N/16, K/2, 16, 2]), which is what the
VDPBF16PS instruction multiplies. N is padded to a multiple of 16 with zero rows. The
`pack_linears` pass rewrites `aten.linear` into this op on the CPU and drops the plain weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxllm.ops.eager import eager_only
from fxllm.ops.registry import register_canonical_op

BLOCK = 16  # output features per packed block


def pack_linear_weight(weight: Tensor) -> Tensor:
    """[N, K] weight -> the packed layout (bfloat16 needs an even K)."""
    if weight.dim() != 2:
        raise ValueError(f"pack_linear_weight expects a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    blocks = -(-n // BLOCK)
    padded = F.pad(weight.detach(), (0, 0, 0, blocks * BLOCK - n))
    if weight.dtype == torch.bfloat16:
        if k % 2:
            raise ValueError(f"a bfloat16 weight needs an even number of input features to pack, got {k}")
        return padded.view(blocks, BLOCK, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return padded.view(blocks, BLOCK, k).permute(0, 2, 1).contiguous()


def unpack_linear_weight(packed: Tensor, out_features: int) -> Tensor:
    """The packed layout -> the plain [N, K] weight."""
    if packed.dim() == 4:  # bfloat16 pairs: [N/16, K/2, 16, 2]
        blocks, pairs = packed.shape[0], packed.shape[1]
        plain = packed.permute(0, 2, 1, 3).reshape(blocks * BLOCK, pairs * 2)
    else:  # [N/16, K, 16]
        blocks, k = packed.shape[0], packed.shape[1]
        plain = packed.permute(0, 2, 1).reshape(blocks * BLOCK, k)
    return plain[:out_features]


@eager_only
def packed_linear_reference(
    x: Tensor, packed_weight: Tensor, out_features: int, bias: Tensor | None
) -> Tensor:
    """Unpack and call F.linear (slow; the CPU backend has a real kernel)."""
    return F.linear(x, unpack_linear_weight(packed_weight, out_features), bias)


@torch.library.custom_op("fxllm::packed_linear", mutates_args=())
def packed_linear(x: Tensor, packed_weight: Tensor, out_features: int, bias: Tensor | None = None) -> Tensor:
    """x @ W^T + bias with W in the packed layout; the output is contiguous."""
    return packed_linear_reference(x, packed_weight, out_features, bias).contiguous()


@packed_linear.register_fake
def _packed_linear_fake(x, packed_weight, out_features, bias=None):
    return x.new_empty((*x.shape[:-1], out_features))


register_canonical_op("packed_linear", packed_linear_reference, inline=True)
