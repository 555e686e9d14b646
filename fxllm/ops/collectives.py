"""Collective ops: `fxllm::all_reduce`, `fxllm::all_reduce_add_rms_norm`, `fxllm::all_gather` (tensor parallelism).

Both are functional (out of place), so passes can match and move them like any other op. The
references call PyTorch's functional collectives (`_c10d_functional.all_reduce` + `wait_tensor`),
which trace into the graph and which Inductor compiles natively; the group is named by its
`group_name` (a string, so the compile cache stores it as data). Faster implementations (peer-to-peer
one-shot / two-shot over symmetric memory on CUDA) register as op backends
(fxllm/backends/cuda_collectives.py) and are chosen by the lowering.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxllm.ops.eager import eager_only
from fxllm.ops.norms import rms_norm_reference
from fxllm.ops.registry import register_canonical_op


@eager_only
def all_reduce_reference(x: Tensor, group_name: str) -> Tensor:
    """Sum of `x` over the ranks of the process group `group_name` (a new tensor)."""
    reduced = torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", group_name)
    return torch.ops._c10d_functional.wait_tensor(reduced)


@torch.library.custom_op("fxllm::all_reduce", mutates_args=())
def all_reduce(x: Tensor, group_name: str) -> Tensor:
    """Sum over the ranks of `group_name`; out of place, contiguous."""
    return all_reduce_reference(x, group_name).contiguous()


@all_reduce.register_fake
def _all_reduce_fake(x, group_name):
    return x.new_empty(x.shape)


@eager_only
def all_reduce_add_rms_norm_reference(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, group_name: str
) -> tuple[Tensor, Tensor]:
    """(rms_norm(all_reduce(x) + residual), all_reduce(x) + residual), each step as unfused."""
    summed = all_reduce_reference.__wrapped__(x, group_name) + residual  # type: ignore[attr-defined]
    return rms_norm_reference.__wrapped__(summed, weight, eps), summed  # type: ignore[attr-defined]


@torch.library.custom_op("fxllm::all_reduce_add_rms_norm", mutates_args=())
def all_reduce_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, group_name: str
) -> tuple[Tensor, Tensor]:
    """All-reduce of a row-parallel GEMM's partial sums, residual add and RMSNorm in one op."""
    normed, summed = all_reduce_add_rms_norm_reference(x, residual, weight, eps, group_name)
    return normed.contiguous(), summed.contiguous()


@all_reduce_add_rms_norm.register_fake
def _all_reduce_add_rms_norm_fake(x, residual, weight, eps, group_name):
    summed = (x + residual).contiguous()
    return summed.new_empty(summed.shape, dtype=torch.promote_types(summed.dtype, weight.dtype)), summed


@eager_only
def all_gather_reference(x: Tensor, group_name: str, group_size: int) -> Tensor:
    """The ranks' `x` [..., n] side by side along the last dimension: [..., group_size * n], rank order."""
    lead, n = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, n).contiguous()
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(flat, group_size, group_name)
    gathered = torch.ops._c10d_functional.wait_tensor(gathered)  # [group_size * rows, n], rank-major
    rows = flat.shape[0]
    return gathered.view(group_size, rows, n).permute(1, 0, 2).reshape(*lead, group_size * n)


@torch.library.custom_op("fxllm::all_gather", mutates_args=())
def all_gather(x: Tensor, group_name: str, group_size: int) -> Tensor:
    """Concatenate the ranks' `x` along the last dimension (a vocabulary-parallel LM head's logits)."""
    return all_gather_reference(x, group_name, group_size).contiguous()


@all_gather.register_fake
def _all_gather_fake(x, group_name, group_size):
    return x.new_empty((*x.shape[:-1], group_size * x.shape[-1]))


register_canonical_op("all_reduce", all_reduce_reference, inline=True)
# Opaque where no backend is chosen (the CPU): its functional reference's `group_name` is typed `Any` in
# the schema (str or ProcessGroup), which Inductor's C++ wrapper cannot pass to a Python fallback; this
# op's `str` it can. It runs once per step on the logits, so nothing is lost by not fusing it.
register_canonical_op("all_gather", all_gather_reference, inline=False)
register_canonical_op("all_reduce_add_rms_norm", all_reduce_add_rms_norm_reference, inline=True)
