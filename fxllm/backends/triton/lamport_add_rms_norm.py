"""All-reduce + residual add + RMSNorm in one barrier-free launch: op backend "triton_lamport" of
`fxllm::all_reduce_add_rms_norm`.

The Lamport all-reduce (lamport_all_reduce.py: clear the next slot, fence, write this rank's part into
every peer's buffer, spin until every part arrived, sum in rank order) with a row's columns sent by
several programs (2 KB each, as the plain kernel spreads them) that each wait for the whole row,
followed by the epilogue the barrier-based fused kernel uses (norms.add_rms_norm_epilogue: the sum
rounded to the model's dtype, + residual, RMSNorm, times weight; both outputs rounded where the unfused
path rounds). It shares the plain Lamport all-reduce's buffer and device-side slot state
(cuda_lamport._state), so the two kernels may follow each other in any order: both follow the same
protocol, and every program of either sends data after its clears. Rows beyond the buffer's segment,
other dtypes and widths above `MAX_COLS` take the unfused path, counted and logged.

Registered by cuda_lamport.py (this module holds no registration, so a CPU test may re-import it under
Triton's interpreter), at priority 0: chosen only where `compile.op_backends={all_reduce_add_rms_norm:
triton_lamport}` names it (with `parallel.fuse_allreduce_rms_norm=true`), until the H100 says it is faster.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxllm.backends.triton.allreduce_norm import Counts, unfused_fallback
from fxllm.backends.triton.lamport_all_reduce import (
    MAX_PROGRAMS,
    MIN_BLOCK_BYTES,
    SENTINELS,
    _fence_acq_rel_sys,
    clear_next_slot,
    finish_call,
    wait_and_sum,
)
from fxllm.backends.triton.norms import add_rms_norm_epilogue

MAX_COLS = 16384
_DTYPES = (torch.bfloat16, torch.float16)


COUNTS = Counts()  # calls through the fused kernel and through the unfused path


@triton.jit
def _lamport_add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, peer_ptrs, state_ptr, rank, n_cols, seg_elems, eps,
    timeout_ns, WORLD: tl.constexpr, BLOCK_N: tl.constexpr, SENTINEL: tl.constexpr, USE_ASM: tl.constexpr,
    PART: tl.constexpr = 0,
):  # fmt: skip
    # Grid (rows, parts): with PART > 0 each of a row's programs sends PART columns of it (the plain
    # kernel's spread of the traffic over SMs), and every program waits for the whole row, which the RMS
    # needs, and stores its PART columns of both outputs. PART == 0: one program per row does it all.
    row = tl.program_id(0)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    rows = tl.num_programs(0)
    pid = row * parts + part
    nprog = rows * parts
    int_ty = tl.int16  # bf16 / fp16 bit patterns: -0.0 is the sentinel
    slot = tl.load(state_ptr).to(tl.int64)  # read before this program arrives at the end
    nxt = (slot + 1) % 3
    slot_elems = seg_elems.to(tl.int64) * WORLD
    own = tl.multiple_of(tl.load(peer_ptrs + rank).to(tl.pointer_type(int_ty)), 16)
    cols = tl.arange(0, BLOCK_N)
    sentinel = tl.full([BLOCK_N], SENTINEL, int_ty)

    # 1. Clear slot (b+1)%3 of this rank's buffer where the call that last used it wrote (lamport_all_reduce.py).
    clear_next_slot(own, state_ptr, nxt, slot_elems, seg_elems, pid, nprog, cols, sentinel, WORLD, BLOCK_N)
    if pid == 0:
        tl.store(state_ptr + 2 + slot, rows * n_cols)  # slot b holds this many elements per segment
    # 2. Every thread's clears, then a system-scope fence, before any data leaves this program.
    tl.debug_barrier()
    if USE_ASM:
        _fence_acq_rel_sys()

    # 3. This program's columns of the row (all of them where PART == 0, and under the interpreter, which
    # runs a launch's programs one after another: a program waiting for columns a later program of its own
    # rank sends would wait forever), -0.0 sent as +0.0, into segment `rank` of every rank's slot b.
    mask = cols < n_cols
    if PART > 0:
        store_mask = mask & (cols >= part * PART) & (cols < part * PART + PART)
    else:
        store_mask = mask
    if PART > 0 and USE_ASM:
        send_cols = part * PART + tl.arange(0, PART)
    else:
        send_cols = cols
    send_mask = send_cols < n_cols
    offset = row.to(tl.int64) * n_cols
    bits = tl.load(x_ptr + offset + send_cols, mask=send_mask, other=0.0).to(int_ty, bitcast=True)
    bits = tl.where(bits == SENTINEL, tl.zeros_like(bits), bits)
    for r in tl.static_range(WORLD):
        peer = tl.multiple_of(tl.load(peer_ptrs + r).to(tl.pointer_type(int_ty)), 16)
        tl.store(peer + slot * slot_elems + rank * seg_elems + offset + send_cols, bits, mask=send_mask)

    # 4. Wait for each rank's whole row, sum in rank order in fp32 (the same sum on every rank).
    dtype = x_ptr.dtype.element_ty
    acc = wait_and_sum(own + slot * slot_elems + offset + cols, seg_elems, mask, state_ptr, timeout_ns, dtype,
                       BLOCK_N, WORLD, SENTINEL, USE_ASM)  # fmt: skip

    # 5. + residual, RMSNorm (over the whole row), times weight; this program's columns stored.
    add_rms_norm_epilogue(acc, residual_ptr, weight_ptr, out_ptr, sum_ptr, offset, cols, mask, store_mask, n_cols,
                          eps)  # fmt: skip

    finish_call(state_ptr, nxt, nprog)


def split_row(rows: int, n_cols: int, itemsize: int) -> tuple[int, int]:
    """(programs per row, columns each sends; 0 = one program per row): 2 KB a program at least, as the
    plain kernel, and all programs co-resident (at most MAX_PROGRAMS)."""
    wanted = max(1, min(triton.cdiv(n_cols, MIN_BLOCK_BYTES // itemsize), MAX_PROGRAMS // max(rows, 1)))
    part = triton.next_power_of_2(triton.cdiv(n_cols, wanted))
    parts = triton.cdiv(n_cols, part)  # every program has columns to send (the clear-then-send argument)
    return (parts, part) if parts > 1 else (1, 0)


def eligible(x: Tensor, residual: Tensor, weight: Tensor, max_bytes: int) -> bool:
    """Whether the fused Lamport kernel takes these tensors (else the unfused path does)."""
    n_cols = x.shape[-1]
    return (
        x.dtype in _DTYPES
        and residual.dtype == x.dtype
        and residual.shape == x.shape
        and weight.shape == (n_cols,)
        and 0 < n_cols <= MAX_COLS
        and 0 < x.numel() * x.element_size() <= max_bytes
    )


def all_reduce_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, group_name: str
) -> tuple[Tensor, Tensor]:
    """(rms_norm(all_reduce(x) + residual) * weight, all_reduce(x) + residual) in one barrier-free launch."""
    from fxllm.backends import cuda_lamport

    max_bytes = cuda_lamport.limits(group_name).max_bytes
    if not eligible(x, residual, weight, max_bytes):
        return unfused_fallback(COUNTS, "lamport all-reduce + RMSNorm", x, residual, weight, eps, group_name)
    state = cuda_lamport._state(group_name, x.device, x.dtype, max_bytes)
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    r2 = residual.reshape(-1, n_cols).contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    COUNTS.fused += 1
    block_n = triton.next_power_of_2(n_cols)
    timeout_ns = int(cuda_lamport.limits(group_name).timeout_s * 1e9)
    parts, part = split_row(x2.shape[0], n_cols, x.element_size())
    _lamport_add_rms_norm_kernel[(x2.shape[0], parts)](
        x2, r2, weight.contiguous(), out, summed, state.peer_ptrs, state.state, state.rank, n_cols,
        state.seg_elems, eps, timeout_ns, WORLD=state.world, BLOCK_N=block_n, SENTINEL=SENTINELS[x.dtype],
        USE_ASM=os.environ.get("TRITON_INTERPRET") != "1", PART=part, num_warps=4 if block_n <= 4096 else 8,
    )  # fmt: skip
    return out, summed
