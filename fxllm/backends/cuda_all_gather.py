"""CUDA all-gather over peer memory: op backend "symm_mem" of `fxllm::all_gather` (vocab-parallel logits).

Each rank copies its part into its own symmetric-memory buffer, a barrier, then reads every peer's part
straight from the peer's buffer over NVLink into its output, and a second barrier (no rank may overwrite
its buffer with the next step's part while a peer still reads it). Only peer-to-peer loads and the
handle's signal-pad barrier: never multicast. Why not NCCL here: an NCCL collective inside our decode
CUDA graphs hung the H100 x2 runs (2026-11-28, benchmarks/RESULTS.md), while the peer-memory all-reduce
in the same graphs ran; this keeps every collective a decode graph holds on peer memory.

The buffer is made on the first call outside a CUDA-graph capture that needs it (every rank makes the
same calls in the same order, so the rendezvous lines up) and grows by doubling up to `MAX_BYTES`; old
buffers stay alive, since a captured graph keeps their addresses. A part larger than `MAX_BYTES` (e.g. a
prefill asking for prompt logprobs of every token) takes NCCL, eagerly, logged with a count; during a
capture that would be an error, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fxllm.backends.registry import OpSite, register_op_backend

logger = logging.getLogger(__name__)

BACKEND = "symm_mem"
PRIORITY = 10
MAX_BYTES = 256 * 2**20  # per rank: 1,024 rows of a 64k-entry bf16 vocabulary shard is 128 MiB
_MIN_BYTES = 4 * 2**20
_WORLD_SIZES = (2, 4, 6, 8)


@dataclass
class GatherCounts:
    """Calls per path (benchmarks and tests read these)."""

    peer: int = 0
    nccl: int = 0


@dataclass
class _Buffers:
    current: Tensor | None = None
    handle: Any = None
    keep: list[Tensor] = field(default_factory=list)  # earlier buffers a captured graph may still read


COUNTS = GatherCounts()
_STATE: dict[tuple[str, torch.device], _Buffers] = {}


def _buffer(group_name: str, device: torch.device, nbytes: int) -> tuple[Tensor, Any]:
    from fxllm.backends.cuda_collectives import symmetric_buffer

    state = _STATE.setdefault((group_name, device), _Buffers())
    if state.current is None or state.current.numel() < nbytes:
        size = max(_MIN_BYTES, state.current.numel() if state.current is not None else 0)
        while size < nbytes:
            size *= 2
        if state.current is not None:
            state.keep.append(state.current)
        state.current, state.handle = symmetric_buffer(
            group_name, min(size, MAX_BYTES), torch.uint8, device, "all_gather"
        )
    return state.current, state.handle


def _nccl(x: Tensor, group_name: str, group_size: int) -> Tensor:
    from fxllm.ops.collectives import all_gather_reference

    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"all_gather: {x.numel() * x.element_size()} bytes per rank is above the peer-memory limit "
            f"({MAX_BYTES} bytes) inside a CUDA-graph capture; use smaller compile.cuda_graph_batch_sizes"
        )
    COUNTS.nccl += 1
    if COUNTS.nccl == 1 or COUNTS.nccl % 1000 == 0:
        logger.info("all_gather: %d bytes per rank above the peer-memory limit took NCCL (%d calls so far)",
                    x.numel() * x.element_size(), COUNTS.nccl)  # fmt: skip
    return all_gather_reference.__wrapped__(x, group_name, group_size).contiguous()  # type: ignore[attr-defined]


def all_gather(x: Tensor, group_name: str, group_size: int) -> Tensor:
    """The ranks' `x` [..., n] side by side along the last dimension, read from the peers' memory."""
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x.numel() // max(n, 1)
    nbytes = x.numel() * x.element_size()
    out = torch.empty((*lead, group_size * n), dtype=x.dtype, device=x.device)
    if nbytes == 0:
        return out
    if nbytes > MAX_BYTES:
        return _nccl(x, group_name, group_size)
    buffer, handle = _buffer(group_name, x.device, nbytes)
    if int(handle.world_size) != group_size:
        raise RuntimeError(
            f"all_gather: group {group_name} has {handle.world_size} ranks, the graph says {group_size}"
        )
    COUNTS.peer += 1
    own = buffer[:nbytes].view(x.dtype).view(rows, n)
    own.copy_(x.reshape(rows, n))
    handle.barrier(channel=0)
    parts = out.view(rows, group_size, n)
    for peer in range(group_size):
        parts[:, peer].copy_(handle.get_buffer(peer, (rows, n), x.dtype))
    handle.barrier(channel=1)  # every peer has read this rank's part: the next call may overwrite it
    return out


def supports(site: OpSite) -> bool:
    """CUDA tensors over a group of 2, 4, 6 or 8 ranks where torch has symmetric memory."""
    from fxllm.backends.cuda_collectives import symm_mem_available

    if site.device.type != "cuda" or not symm_mem_available():
        return False
    group_name, group_size = site.args[1], site.args[2]
    return isinstance(group_name, str) and group_size in _WORLD_SIZES


register_op_backend("all_gather", BACKEND, all_gather, supports=supports, _builtin=True, priority=PRIORITY)
