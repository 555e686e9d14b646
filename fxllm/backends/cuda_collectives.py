"""CUDA all-reduce: peer-to-peer one-shot / two-shot over PyTorch symmetric memory, NCCL above.

Op backend "symm_mem" of `fxllm::all_reduce` and `fxllm::all_reduce_add_rms_norm`. Each call picks
its algorithm by message size, since the token dimension is dynamic in the compiled graph:

* up to `one_shot_max_bytes`: `symm_mem.one_shot_all_reduce_out` (every rank reads every peer's
  buffer and sums; lowest latency for decode-sized messages),
* up to `two_shot_max_bytes`: `symm_mem.two_shot_all_reduce_` (reduce-scatter + all-gather over
  peer memory),
* above, or for sizes the kernels cannot take (not 16-byte aligned): NCCL through the functional
  collectives.

Only the peer-to-peer kernels are used: never the `multimem_*` ops, which need NVLink multicast
(not allowed on the lent machines). The symmetric buffer of a (group, device, dtype) is allocated and
rendezvoused when the group is made (`configure_group`, the model's dtype) or else on the first call,
which every rank makes together during the warm-up request; a CUDA-graph capture that would need a
new buffer fails with that reason. The sizes
come from `parallel.one_shot_max_bytes` / `two_shot_max_bytes`, registered per group when the group
is made (`configure_group`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fxllm.backends.registry import OpSite, register_op_backend

logger = logging.getLogger(__name__)

BACKEND = "symm_mem"
PRIORITY = 10
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_WORLD_SIZES = (2, 4, 6, 8)  # the peer-to-peer kernels' supported group sizes


@dataclass
class GroupLimits:
    """Message sizes (bytes) up to which the one-shot and two-shot kernels run for a group."""

    one_shot_max_bytes: int = 256 * 1024
    two_shot_max_bytes: int = 8 * 2**20


@dataclass
class Counts:
    """How many calls took each path (benchmarks and tests read these)."""

    one_shot: int = 0
    two_shot: int = 0
    nccl: int = 0


_LIMITS: dict[str, GroupLimits] = {}
_BUFFERS: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
COUNTS = Counts()


def configure_group(
    group_name: str,
    one_shot_max_bytes: int,
    two_shot_max_bytes: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Set the size limits of group `group_name`, and make its symmetric buffer for `dtype` on `device` now
    (a collective: every rank calls this when the tensor-parallel group is made, long before any capture)."""
    limits = _LIMITS[group_name] = GroupLimits(one_shot_max_bytes, two_shot_max_bytes)
    if (
        device is not None
        and dtype in _DTYPES
        and symm_mem_available()
        and _group_size(group_name) in _WORLD_SIZES
    ):
        _buffer(group_name, device, dtype, limits)


def _group_size(group_name: str) -> int:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    return int(dist.get_world_size(_resolve_process_group(group_name)))


def symm_mem_available() -> bool:
    """Whether this torch has the peer-to-peer symmetric-memory all-reduce ops."""
    ops = getattr(torch.ops, "symm_mem", None)
    return ops is not None and hasattr(ops, "one_shot_all_reduce") and hasattr(ops, "two_shot_all_reduce_")


def symmetric_buffer(
    group_name: str, numel: int, dtype: torch.dtype, device: torch.device, what: str
) -> tuple[Tensor, Any]:
    """A new symmetric-memory buffer of `numel` elements over group `group_name` and its rendezvous handle.
    A collective (every rank calls it together); refused while a CUDA graph is captured."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what}: no symmetric-memory buffer for {dtype} on {device} yet, and a CUDA graph is being "
            "captured (buffers must exist before capture: run one eager step first)"
        )
    import torch.distributed._symmetric_memory as symm_mem

    # Older torch needs the group enabled before a rendezvous; newer ones deprecate the call.
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    enabled = getattr(symm_mem, "is_symm_mem_enabled_for_group", None)
    if enable is not None and (enabled is None or not enabled(group_name)):
        enable(group_name)
    buffer = symm_mem.empty(numel, dtype=dtype, device=device)
    handle = symm_mem.rendezvous(buffer, group_name)
    logger.info("%s: %.1f MiB symmetric-memory buffer of %s on %s, group %s",
                what, numel * dtype.itemsize / 2**20, dtype, device, group_name)  # fmt: skip
    return buffer, handle


def _buffer(group_name: str, device: torch.device, dtype: torch.dtype, limits: GroupLimits) -> Tensor:
    key = (group_name, device, dtype)
    buffer = _BUFFERS.get(key)
    if buffer is None:
        numel = limits.two_shot_max_bytes // dtype.itemsize
        buffer, _ = symmetric_buffer(group_name, numel, dtype, device, "all_reduce")
        _BUFFERS[key] = buffer
    return buffer


def _nccl(x: Tensor, group_name: str) -> Tensor:
    COUNTS.nccl += 1
    reduced = torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", group_name)
    return torch.ops._c10d_functional.wait_tensor(reduced)


def all_reduce(x: Tensor, group_name: str) -> Tensor:
    """Sum over the group: one-shot, two-shot or NCCL by message size."""
    limits = _LIMITS.get(group_name, GroupLimits())
    nbytes = x.numel() * x.element_size()
    if nbytes > limits.two_shot_max_bytes or nbytes % 16 or x.dtype not in _DTYPES or nbytes == 0:
        return _nccl(x, group_name)
    buffer = _buffer(group_name, x.device, x.dtype, limits)[: x.numel()]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ops = torch.ops.symm_mem
    if nbytes <= limits.one_shot_max_bytes:
        COUNTS.one_shot += 1
        if hasattr(ops, "one_shot_all_reduce_copy_out"):  # the copy into the buffer runs inside the kernel
            ops.one_shot_all_reduce_copy_out(buffer, x.reshape(-1), "sum", group_name, out.view(-1))
        elif hasattr(ops, "one_shot_all_reduce_out"):
            buffer.copy_(x.reshape(-1))
            ops.one_shot_all_reduce_out(buffer, "sum", group_name, out.view(-1))
        else:
            buffer.copy_(x.reshape(-1))
            out.view(-1).copy_(ops.one_shot_all_reduce(buffer, "sum", group_name))
        return out
    COUNTS.two_shot += 1
    buffer.copy_(x.reshape(-1))
    if hasattr(ops, "two_shot_all_reduce_out"):  # the sum lands in `out`, not back in the buffer
        ops.two_shot_all_reduce_out(buffer, "sum", group_name, out.view(-1))
    else:
        ops.two_shot_all_reduce_(buffer, "sum", group_name)
        out.view(-1).copy_(buffer)
    return out


def all_reduce_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, group_name: str
) -> tuple[Tensor, Tensor]:
    """The all-reduce above, then the Triton residual add + RMSNorm (one read of each operand)."""
    from fxllm.backends.triton import norms

    return norms.fused_add_rms_norm(all_reduce(x, group_name), residual, weight, eps)


def supports(site: OpSite) -> bool:
    """CUDA tensors of a supported dtype, over a group of 2, 4, 6 or 8 ranks, where torch has the ops."""
    if site.device.type != "cuda" or site.dtype not in _DTYPES or not symm_mem_available():
        return False
    group_name = site.args[-1]
    try:
        return isinstance(group_name, str) and _group_size(group_name) in _WORLD_SIZES
    except (RuntimeError, ValueError, KeyError):
        return False  # no such group in this process (e.g. `fxllm compile --explain` without ranks)


def _register() -> None:
    import fxllm.ops  # noqa: F401  (the canonical ops exist before backends register for them)

    register_op_backend(
        "all_reduce", BACKEND, all_reduce, supports=supports, _builtin=True, priority=PRIORITY
    )
    register_op_backend(
        "all_reduce_add_rms_norm",
        BACKEND,
        all_reduce_add_rms_norm,
        supports=supports,
        _builtin=True,
        priority=PRIORITY,
    )


_register()
