"""One Triton kernel for all-reduce + residual add + RMSNorm over peer memory (decode-sized messages).

Op backend "triton_symm" of `fxllm::all_reduce_add_rms_norm`. Each program owns one token row:
  1. it copies its rank's partial row into this rank's symmetric buffer,
  2. a barrier with the same program on every peer (flags in the buffer's signal pad, release/acquire
     at system scope, one thread per peer),
  3. it reads the row from every rank's buffer over NVLink (fixed rank order, so every rank computes
     bit-identical sums), adds the residual, normalises and scales, and writes both outputs,
  4. a second barrier, so that no rank overwrites its buffer row (the next layer's call) while a peer
     still reads it.
One launch replaces three (copy + one-shot all-reduce, then add + RMSNorm). Only peer-to-peer loads
and stores: no `multimem` instruction, no NVLink multicast. Rows beyond `MAX_ROWS`, other dtypes or
widths take the unfused path (`cuda_collectives.all_reduce_add_rms_norm`), counted and logged once.
The symmetric buffer is made and rendezvoused on the first call (every rank makes it together in the
warm-up request, before any CUDA graph is captured), separate from the all-reduce's, so the two
kernels never share signal-pad slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxllm.backends.registry import OpSite, register_op_backend
from fxllm.backends.triton.norms import add_rms_norm_epilogue

logger = logging.getLogger(__name__)

BACKEND = "triton_symm"
PRIORITY = 20  # above the unfused symm_mem backend (10)
MAX_ROWS = 32  # decode-sized: the one-shot regime (32 x 4096 bf16 = 256 KiB per rank)
MAX_COLS = 16384
_DTYPES = (torch.bfloat16, torch.float16)
_WORLD_SIZES = (2, 4, 8)


@dataclass
class Counts:
    """Calls through the fused kernel and through the unfused fallback (benchmarks and tests read these)."""

    fused: int = 0
    fallback: int = 0


COUNTS = Counts()


def unfused_fallback(
    counts: Counts, what: str, x: Tensor, residual: Tensor, weight: Tensor, eps: float, group_name: str
) -> tuple[Tensor, Tensor]:
    """The unfused all-reduce, then add + RMSNorm, for tensors a fused kernel does not take: counted, logged."""
    from fxllm.backends import cuda_collectives

    counts.fallback += 1
    if counts.fallback == 1 or counts.fallback % 10000 == 0:
        logger.info("%s: %s rows of %s %s take the unfused path (%d calls so far)", what,
                    x.numel() // max(x.shape[-1], 1), x.shape[-1], x.dtype, counts.fallback)  # fmt: skip
    return cuda_collectives.all_reduce_add_rms_norm(x, residual, weight, eps, group_name)


@dataclass
class _PeerState:
    buffer: Tensor
    buffer_ptrs: int  # device address of the [world] array of every rank's buffer base
    signal_pads: int  # device address of the [world] array of every rank's signal pad
    rank: int
    world: int


_STATES: dict[tuple[str, torch.device, torch.dtype], _PeerState] = {}


@triton.jit
def _thread_id():
    return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _send_flag(address):
    # Spin until the slot is 0 (the peer consumed the last flag), then set it; release: this block's
    # earlier writes (made visible to this thread by the block barrier before) reach the peer first.
    tl.inline_asm_elementwise(
        """
        {
            .reg .u32 %old;
            .reg .pred %done;
        send_flag_loop:
            atom.global.release.sys.cas.b32 %old, [$1], 0, 1;
            setp.eq.u32 %done, %old, 0;
            @!%done bra send_flag_loop;
            mov.u32 $0, %old;
        }
        """,
        "=r, l",
        [address],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _wait_flag(address):
    # Spin until the peer's flag is set, then clear it; acquire: the peer's writes before it are visible.
    tl.inline_asm_elementwise(
        """
        {
            .reg .u32 %old;
            .reg .pred %done;
        wait_flag_loop:
            atom.global.acquire.sys.cas.b32 %old, [$1], 1, 0;
            setp.eq.u32 %done, %old, 1;
            @!%done bra wait_flag_loop;
            mov.u32 $0, %old;
        }
        """,
        "=r, l",
        [address],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _row_barrier(signal_pads, row, rank, WORLD: tl.constexpr):
    """Every rank's program `row` meets here: thread p < WORLD signals peer p and waits for peer p."""
    tl.debug_barrier()
    tid = _thread_id()
    if tid < WORLD:
        remote_pad = tl.load(signal_pads + tid).to(tl.pointer_type(tl.uint32))
        local_pad = tl.load(signal_pads + rank).to(tl.pointer_type(tl.uint32))
        _send_flag(remote_pad + row * WORLD + rank)
        _wait_flag(local_pad + row * WORLD + tid)
    tl.debug_barrier()


@triton.jit
def _allreduce_add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, buffer_ptrs, signal_pads, rank, n_cols, eps,
    WORLD: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    offset = row.to(tl.int64) * n_cols
    buffers = buffer_ptrs.to(tl.pointer_type(tl.uint64))
    pads = signal_pads.to(tl.pointer_type(tl.uint64))
    dtype = x_ptr.dtype.element_ty
    own = tl.load(buffers + rank).to(tl.pointer_type(dtype))
    tl.store(own + offset + cols, tl.load(x_ptr + offset + cols, mask=mask, other=0.0), mask=mask)
    _row_barrier(pads, row, rank, WORLD)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for peer in tl.static_range(WORLD):  # rank order on every rank: the same sum everywhere
        peer_buffer = tl.load(buffers + peer).to(tl.pointer_type(dtype))
        acc += tl.load(peer_buffer + offset + cols, mask=mask, other=0.0, volatile=True).to(tl.float32)
    _row_barrier(pads, row, rank, WORLD)  # every peer has read this rank's row: it may be overwritten
    add_rms_norm_epilogue(
        acc, residual_ptr, weight_ptr, out_ptr, sum_ptr, offset, cols, mask, mask, n_cols, eps
    )


def _group_rank_size(group_name: str) -> tuple[int, int]:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    return int(dist.get_rank(group)), int(dist.get_world_size(group))


def _state(group_name: str, device: torch.device, dtype: torch.dtype) -> _PeerState:
    key = (group_name, device, dtype)
    state = _STATES.get(key)
    if state is None:
        from fxllm.backends.cuda_collectives import symmetric_buffer

        buffer, handle = symmetric_buffer(
            group_name, MAX_ROWS * MAX_COLS, dtype, device, "all_reduce_add_rms_norm"
        )
        world = int(handle.world_size)
        pad_bytes = int(getattr(handle, "signal_pad_size", 0) or 0)
        if pad_bytes and pad_bytes < MAX_ROWS * world * 4:
            raise RuntimeError(
                f"symmetric-memory signal pad of {pad_bytes} bytes is too small for {MAX_ROWS} rows"
            )
        state = _PeerState(buffer, int(handle.buffer_ptrs_dev), int(handle.signal_pad_ptrs_dev),
                           int(handle.rank), world)  # fmt: skip
        _STATES[key] = state
    return state


def _eligible(x: Tensor, residual: Tensor, weight: Tensor) -> bool:
    n_cols = x.shape[-1]
    return (
        x.dtype in _DTYPES
        and residual.dtype == x.dtype
        and residual.shape == x.shape
        and weight.shape == (n_cols,)
        and n_cols <= MAX_COLS
        and x.numel() // max(n_cols, 1) <= MAX_ROWS
    )


def all_reduce_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, group_name: str
) -> tuple[Tensor, Tensor]:
    """(rms_norm(all_reduce(x) + residual) * weight, all_reduce(x) + residual) in one kernel launch."""
    if not _eligible(x, residual, weight):
        return unfused_fallback(COUNTS, "fused all-reduce + RMSNorm", x, residual, weight, eps, group_name)
    n_cols = x.shape[-1]
    state = _state(group_name, x.device, x.dtype)
    x2 = x.reshape(-1, n_cols).contiguous()
    r2 = residual.reshape(-1, n_cols).contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows:
        COUNTS.fused += 1
        block_n = triton.next_power_of_2(n_cols)
        _allreduce_add_rms_norm_kernel[(rows,)](
            x2, r2, weight.contiguous(), out, summed, state.buffer_ptrs, state.signal_pads, state.rank,
            n_cols, eps, WORLD=state.world, BLOCK_N=block_n, num_warps=4 if block_n <= 4096 else 8,
        )  # fmt: skip
    return out, summed


def supports(site: OpSite) -> bool:
    """CUDA bf16/fp16 over a group of 2, 4 or 8 ranks where symmetric memory exists."""
    from fxllm.backends import cuda_collectives

    if site.device.type != "cuda" or site.dtype not in _DTYPES or not cuda_collectives.symm_mem_available():
        return False
    group_name = site.args[-1]
    try:
        return isinstance(group_name, str) and _group_rank_size(group_name)[1] in _WORLD_SIZES
    except (RuntimeError, ValueError, KeyError):
        return False


register_op_backend("all_reduce_add_rms_norm", BACKEND, all_reduce_add_rms_norm, supports=supports,
                    _builtin=True, priority=PRIORITY)  # fmt: skip
