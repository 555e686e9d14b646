"""CUDA all-reduce "triton_lamport": one barrier-free Triton launch per decode-sized message.

Op backend of `fxllm::all_reduce`. Messages up to `parallel.lamport_max_bytes` run the Lamport kernel
(fxllm/backends/triton/lamport_all_reduce.py: each rank writes its part straight into every peer's
buffer and spins until every peer's part arrived, the data itself being the flag, so a call costs one
launch and one NVLink write + read, without the two signal-pad barriers of PyTorch's one-shot). Larger
messages, and every message when the limit is 0, take the "symm_mem" backend
(`cuda_collectives.all_reduce`: one-shot, two-shot or NCCL by size), logged with a count.

Per (group, device, dtype) one symmetric buffer of 3 slots x W segments x `lamport_max_bytes` (1.5 MiB
for W=2 at 256 KiB) and a device-side state (current slot, per-slot sizes) are made on the first call,
which every rank makes together in the warm-up request, outside any CUDA-graph capture (the same rule as
cuda_all_gather.py): filled with the sentinel, then a barrier over the buffer's signal pad so that no
peer writes into a buffer before its owner filled it. A spin that outlasts `parallel.collective_timeout_s`
traps (the rank dies and the engine reports it) instead of hanging.

Priority 0: chosen only where `compile.op_backends={all_reduce: triton_lamport}` names it, until the
H100 measurements (benchmarks/gpu_allreduce.py) say it beats "symm_mem". The same buffer and slot state
serve backend "triton_lamport" of `fxllm::all_reduce_add_rms_norm` (triton/lamport_add_rms_norm.py: the
all-reduce, residual add and RMSNorm in one launch; with `parallel.fuse_allreduce_rms_norm=true`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from fxllm.backends.registry import OpSite, register_op_backend
from fxllm.config import ParallelConfig

logger = logging.getLogger(__name__)

BACKEND = "triton_lamport"
# Above symm_mem (10): 2 x H100, 8B TP=2 batch-1 decode 3.94 vs 4.14 ms/token, every result exact
# (2026-11-28, benchmarks/RESULTS.md). The fused all-reduce + RMSNorm stays at 0 (not run on a GPU yet).
PRIORITY = 15
FUSED_PRIORITY = 0
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_WORLD_SIZES = (2, 4, 8)
_ALIGN_ELEMS = 16  # segments a multiple of 16 elements: 16-byte vector accesses for every dtype


@dataclass
class LamportLimits:
    """Largest message (bytes) of the Lamport kernel for a group (0: never), and its spin timeout."""

    max_bytes: int = ParallelConfig.lamport_max_bytes
    timeout_s: float = ParallelConfig.collective_timeout_s


@dataclass
class Counts:
    """Calls per path (benchmarks and tests read these)."""

    lamport: int = 0
    fallback: int = 0  # above parallel.lamport_max_bytes (or a dtype the kernel does not take)
    eager: int = 0  # outside a CUDA-graph capture: symm_mem by design


@dataclass
class _State:
    buffer: Tensor  # 3 x world x seg_elems integers of the dtype's width, this rank's part
    peer_ptrs: Tensor  # int64 [world]: every rank's buffer address
    state: Tensor  # int32: current slot, programs arrived, elements per slot
    rank: int
    world: int
    seg_elems: int


COUNTS = Counts()
_LIMITS: dict[str, LamportLimits] = {}
_STATES: dict[tuple[str, torch.device, torch.dtype], _State] = {}


def configure_group(group_name: str, max_bytes: int, timeout_s: float) -> None:
    """Set group `group_name`'s Lamport limit (bytes; 0 disables) and spin timeout."""
    if max_bytes < 0:
        raise ValueError(f"parallel.lamport_max_bytes must be >= 0, got {max_bytes}")
    _LIMITS[group_name] = LamportLimits(max_bytes, timeout_s)


def limits(group_name: str) -> LamportLimits:
    """The limits of `group_name` (the config's defaults where it was never configured)."""
    return _LIMITS.get(group_name, LamportLimits())


def segment_elems(max_bytes: int, dtype: torch.dtype) -> int:
    """Elements per segment of a buffer for messages up to `max_bytes` of `dtype` (a multiple of 16)."""
    elems = max_bytes // dtype.itemsize
    return -(-elems // _ALIGN_ELEMS) * _ALIGN_ELEMS


def route(nbytes: int, dtype: torch.dtype, max_bytes: int, capturing: bool = True) -> str:
    """ "lamport" or "fallback" for a message of `nbytes` (host logic, tested on the CPU). Outside a CUDA-graph
    capture the fallback too: an eager Lamport call costs ~65 us of Triton's Python launch path against
    ~37 us for symm_mem (2 x H100), while inside a graph the Lamport kernel is 4.9 us against 8.6."""
    if max_bytes <= 0 or nbytes == 0 or nbytes > max_bytes or dtype not in _DTYPES or not capturing:
        return "fallback"
    return "lamport"


def _state(group_name: str, device: torch.device, dtype: torch.dtype, max_bytes: int) -> _State:
    key = (group_name, device, dtype)
    state = _STATES.get(key)
    if state is not None:
        return state
    from fxllm.backends.cuda_collectives import _group_size, symmetric_buffer
    from fxllm.backends.triton.lamport_all_reduce import INT_TYPES, SENTINELS, new_state

    seg = segment_elems(max_bytes, dtype)
    world = _group_size(group_name)
    buffer, handle = symmetric_buffer(
        group_name, 3 * world * seg, INT_TYPES[dtype], device, "lamport all_reduce"
    )
    buffer.fill_(SENTINELS[dtype])
    # No peer may write into this buffer before it holds the sentinel everywhere: the barrier follows
    # the fill on this stream, and a peer's first kernel follows the barrier on its stream.
    handle.barrier(channel=0)
    torch.cuda.synchronize(device)
    # buffer_ptrs are the bases of the ranks' allocations; a buffer carved out of a pool sits at the same
    # offset into each of them (the symmetric layout), which the tensor's own address gives.
    bases = [int(p) for p in handle.buffer_ptrs]
    offset = buffer.data_ptr() - bases[int(handle.rank)]
    if any((b + offset) % 16 for b in bases):  # the kernel's 16-byte vector accesses need it
        raise RuntimeError(
            f"lamport all_reduce: symmetric buffers not 16-byte aligned: {bases}, offset {offset}"
        )
    ptrs = torch.tensor([b + offset for b in bases], dtype=torch.int64, device=device)
    state = _State(buffer, ptrs, new_state(device), int(handle.rank), int(handle.world_size), seg)
    _STATES[key] = state
    return state


def _fallback(x: Tensor, group_name: str) -> Tensor:
    from fxllm.backends import cuda_collectives

    COUNTS.fallback += 1
    if COUNTS.fallback == 1 or COUNTS.fallback % 10000 == 0:
        logger.info("lamport all_reduce: %d bytes of %s above parallel.lamport_max_bytes (%d) took symm_mem "
                    "(%d calls so far)", x.numel() * x.element_size(), x.dtype,
                    limits(group_name).max_bytes, COUNTS.fallback)  # fmt: skip
    return cuda_collectives.all_reduce(x, group_name)


def all_reduce(x: Tensor, group_name: str) -> Tensor:
    """Sum over the group: the Lamport kernel inside CUDA graphs up to the group's limit, symm_mem otherwise."""
    group_limits = limits(group_name)
    nbytes = x.numel() * x.element_size()
    if nbytes == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if route(nbytes, x.dtype, group_limits.max_bytes) != "lamport":
        return _fallback(x, group_name)
    # Made in the eager warm-up call that precedes every capture (every rank together): a rendezvous cannot
    # run inside a capture.
    state = _state(group_name, x.device, x.dtype, group_limits.max_bytes)
    if route(nbytes, x.dtype, group_limits.max_bytes, torch.cuda.is_current_stream_capturing()) != "lamport":
        from fxllm.backends import cuda_collectives

        COUNTS.eager += 1
        if COUNTS.eager == 1:
            logger.info("lamport all_reduce: eager calls (outside CUDA graphs) take symm_mem, whose launch is "
                        "cheaper; counted in cuda_lamport.COUNTS.eager")  # fmt: skip
        return cuda_collectives.all_reduce(x, group_name)
    from fxllm.backends.triton.lamport_all_reduce import lamport_all_reduce

    COUNTS.lamport += 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    lamport_all_reduce(x.contiguous(), out, state.peer_ptrs, state.state, state.rank, state.world,
                       state.seg_elems, int(group_limits.timeout_s * 1e9))  # fmt: skip
    return out


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(site: OpSite) -> bool:
    """Where symm_mem serves the op (CUDA, its dtypes, a group of this process), over 2, 4 or 8 ranks, with
    triton."""
    from fxllm.backends import cuda_collectives

    if not cuda_collectives.supports(site) or not _triton_available():
        return False
    return cuda_collectives._group_size(site.args[-1]) in _WORLD_SIZES  # the group exists: supports said so


def all_reduce_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, group_name: str
) -> tuple[Tensor, Tensor]:
    """All-reduce + residual add + RMSNorm in one Lamport launch (triton/lamport_add_rms_norm.py)."""
    from fxllm.backends.triton import lamport_add_rms_norm

    return lamport_add_rms_norm.all_reduce_add_rms_norm(x, residual, weight, eps, group_name)


def _supports_fused(site: OpSite) -> bool:
    return site.dtype in (torch.bfloat16, torch.float16) and supports(site)


def _register() -> None:
    import fxllm.ops  # noqa: F401  (the canonical ops exist before backends register for them)

    register_op_backend(
        "all_reduce", BACKEND, all_reduce, supports=supports, _builtin=True, priority=PRIORITY
    )
    register_op_backend("all_reduce_add_rms_norm", BACKEND, all_reduce_add_rms_norm, supports=_supports_fused,
                        _builtin=True, priority=FUSED_PRIORITY)  # fmt: skip


_register()
