"""A barrier-free one-shot all-reduce over peer memory ("Lamport" all-reduce), one Triton launch per call.

Each rank owns a symmetric buffer of 3 slots x W segments x `seg_elems` elements, every element
initialised to a sentinel that data never holds: the bit pattern of negative zero (0x8000 for
bf16/fp16, 0x80000000 for fp32; inputs' -0.0 are sent as +0.0, which sums the same). A call uses slot
b (a device-side state, so CUDA-graph replays and eager calls rotate the same way) and each program:
  1. clears to the sentinel, in its OWN buffer, slot (b+1)%3 (all W segments, as many elements as the
     call that last used that slot wrote there: a device-side size per slot),
  2. a CTA barrier, then a system-scope fence (`fence.acq_rel.sys`), so those clears are ordered
     before any of its data below can reach a peer,
  3. stores its range of the input into segment `rank` of slot b of EVERY rank's buffer (itself too),
  4. spins with volatile loads on its own slot b, segment by segment, until no element of its range is
     the sentinel (the data itself is the flag: no barrier, no signal pad),
  5. sums the W segments in rank order in fp32 (the same order on every rank, so every rank holds
     bit-identical results) and stores the sum, rounded once, into `out`.
The last program to finish (an atomic count) moves the slot to (b+1)%3 and records how many elements
slot b holds now.

Why clearing before sending is safe, and why 3 slots: a peer writes into slot (b+1)%3 of my buffer only
in its next call, which its stream starts only after its current call finished, i.e. after it received
ALL my data of this call; every program of mine sends its data only after its own clears and the fence
(and every program has data to send), so every clear lands before any write of the next call. The slot I
read in this call (b) is written by peers only in this call; the one I clear ((b+1)%3) was last written
two calls ago and I consumed all of it then. Two slots would do under strict stream order; the third keeps
the reader of slot b and the writers of slot (b+1)%3 apart if launches ever overlap (programmatic
dependent launch), at the cost of memory only (3 x W x 256 KiB). Any program count per call works, since
the clear is spread over the programs by a strided loop rather than tied to a program's own range.

A spin that never ends (a dead or stuck peer) must not hang the engine: each spin reads %globaltimer and
executes `trap` after `timeout_ns`, which fails the CUDA context, so the rank dies and the engine's
rank watchdog reports it. Under Triton's interpreter (CPU tests) the inline assembly is left out
(`USE_ASM=False`): the interpreter runs programs one after another with sequential consistency.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_PROGRAMS = (
    128  # all co-resident on an H100 (132 SMs): a spinning program never waits for an unscheduled one
)
MIN_BLOCK_BYTES = 2048  # 4 warps x 32 threads x one 16-byte vector each
SENTINELS = {torch.bfloat16: -(2**15), torch.float16: -(2**15), torch.float32: -(2**31)}  # -0.0 as signed int
INT_TYPES = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
INTERPRETER_SPINS: tl.constexpr = tl.constexpr(2000)  # the interpreter's bound on one wait (~3 s, CPU tests)
STATE_LEN = 5  # [slot, programs arrived, elements in slot 0, slot 1, slot 2]


@triton.jit
def _fence_acq_rel_sys():
    tl.inline_asm_elementwise("fence.acq_rel.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)  # fmt: skip


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)  # fmt: skip


@triton.jit
def _trap():
    tl.inline_asm_elementwise("trap; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _lamport_all_reduce_kernel(
    x_ptr, out_ptr, peer_ptrs, state_ptr, rank, n, seg_elems, timeout_ns,
    WORLD: tl.constexpr, BLOCK: tl.constexpr, SENTINEL: tl.constexpr, USE_ASM: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dtype = x_ptr.dtype.element_ty
    int_ty = tl.int32 if dtype == tl.float32 else tl.int16  # the buffer holds bit patterns: -0.0 != +0.0
    slot = tl.load(state_ptr).to(tl.int64)  # read before this program arrives below: see the docstring
    nxt = (slot + 1) % 3
    slot_elems = seg_elems.to(tl.int64) * WORLD
    # Buffers are 16-byte aligned and seg_elems a multiple of 16 (the host checks): 16-byte vector accesses.
    own = tl.multiple_of(tl.load(peer_ptrs + rank).to(tl.pointer_type(int_ty)), 16)
    arange = tl.arange(0, BLOCK)
    sentinel = tl.full([BLOCK], SENTINEL, int_ty)

    # 1. Clear slot (b+1)%3 of this rank's buffer where the call that last used it wrote.
    # Rounded up to 16 elements (the segments are, and those past the size are the sentinel already) so
    # the stores are 16-byte vectors.
    clear_next_slot(own, state_ptr, nxt, slot_elems, seg_elems, pid, nprog, arange, sentinel, WORLD, BLOCK)
    if pid == 0:
        tl.store(state_ptr + 2 + slot, n)  # slot b holds n elements per segment after this call
    # 2. Every thread's clears, then a system-scope fence, before any data leaves this program.
    tl.debug_barrier()
    if USE_ASM:
        _fence_acq_rel_sys()

    # 3. This program's range of the input, -0.0 sent as +0.0, into segment `rank` of every rank's slot b.
    offs = tl.max_contiguous(tl.multiple_of(pid * BLOCK + arange, BLOCK), BLOCK)
    mask = offs < n
    bits = tl.load(x_ptr + offs, mask=mask, other=0.0).to(int_ty, bitcast=True)
    bits = tl.where(bits == SENTINEL, tl.zeros_like(bits), bits)
    for r in tl.static_range(WORLD):
        peer = tl.multiple_of(tl.load(peer_ptrs + r).to(tl.pointer_type(int_ty)), 16)
        tl.store(peer + slot * slot_elems + rank * seg_elems + offs, bits, mask=mask)

    # 4-5. Wait for each rank's segment, sum in rank order in fp32.
    acc = wait_and_sum(own + slot * slot_elems + offs, seg_elems, mask, state_ptr, timeout_ns, dtype, BLOCK,
                       WORLD, SENTINEL, USE_ASM)  # fmt: skip
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    finish_call(state_ptr, nxt, nprog)


@triton.jit
def clear_next_slot(own, state_ptr, nxt, slot_elems, seg_elems, pid, nprog, arange, sentinel,
                    WORLD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Step 1: this program's share of slot `nxt` of its own buffer (every segment, as far as the call that
    last used it wrote, rounded up to 16 elements so the stores are 16-byte vectors) back to the sentinel."""
    clear_n = tl.multiple_of((tl.load(state_ptr + 2 + nxt) + 15) // 16 * 16, 16)
    for start in range(pid * BLOCK, clear_n, nprog * BLOCK):
        idx = tl.max_contiguous(tl.multiple_of(start + arange, BLOCK), BLOCK)
        for r in tl.static_range(WORLD):
            tl.store(own + nxt * slot_elems + r * seg_elems + idx, sentinel, mask=idx < clear_n)


@triton.jit
def wait_and_sum(first, seg_elems, mask, state_ptr, timeout_ns, dtype: tl.constexpr, BLOCK: tl.constexpr,
                 WORLD: tl.constexpr, SENTINEL: tl.constexpr, USE_ASM: tl.constexpr):  # fmt: skip
    """Steps 4-5: spin on each rank's segment (`first` + r * seg_elems) until no element is the sentinel,
    then the fp32 sum in rank order."""
    if USE_ASM:
        started = _globaltimer()
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        segment = first + r * seg_elems
        got = tl.load(segment, mask=mask, other=0, volatile=True)
        pending = tl.max(((got == SENTINEL) & mask).to(tl.int32), axis=0)
        spins = 0
        while pending > 0:
            got = tl.load(segment, mask=mask, other=0, volatile=True)
            pending = tl.max(((got == SENTINEL) & mask).to(tl.int32), axis=0)
            if USE_ASM:
                if _globaltimer() - started > timeout_ns:
                    _trap()  # a peer never sent: fail the context (the rank dies) rather than hang
            else:  # the interpreter (tests): a bounded wait, so a bug fails the test instead of hanging it
                spins += 1
                if spins >= INTERPRETER_SPINS:
                    pending = 0
                    tl.store(state_ptr + 1, -(2**30))  # the host raises (the interpreter has no assert)
        acc += got.to(dtype, bitcast=True).to(tl.float32)
    return acc


@triton.jit
def finish_call(state_ptr, nxt, nprog):
    """The last program of a call moves every rank's next call to slot (b+1)%3."""
    arrived = tl.atomic_add(state_ptr + 1, 1)
    if arrived == nprog - 1:
        tl.store(state_ptr + 1, 0)
        tl.store(state_ptr, nxt.to(tl.int32))


def block_for(numel: int, dtype: torch.dtype) -> int:
    """Elements per program: 2 KB at least, more for large messages so the grid stays <= MAX_PROGRAMS."""
    minimum = MIN_BLOCK_BYTES // dtype.itemsize
    return max(minimum, triton.next_power_of_2(triton.cdiv(numel, MAX_PROGRAMS)))


def new_state(device: torch.device) -> Tensor:
    """The device-side state of a buffer: slot 0, nothing arrived, every slot empty."""
    return torch.zeros(STATE_LEN, dtype=torch.int32, device=device)


def lamport_all_reduce(
    x: Tensor, out: Tensor, peer_ptrs: Tensor, state: Tensor, rank: int, world: int, seg_elems: int,
    timeout_ns: int,
) -> Tensor:  # fmt: skip
    """Sum `x` over the `world` ranks into `out` (contiguous, same shape and dtype): one launch.

    `peer_ptrs`: int64 tensor of every rank's buffer address (3 x world x seg_elems elements each, of
    the integer type as wide as x's dtype); `state`: this buffer's `new_state`. Every rank must make the
    same calls, in the same order, with the same sizes.
    """
    n = x.numel()
    if seg_elems % 16:  # the kernel promises the compiler 16-byte aligned segments
        raise ValueError(f"lamport all-reduce: segments of {seg_elems} elements, not a multiple of 16")
    if n > seg_elems:
        raise ValueError(f"lamport all-reduce: {n} elements exceed the buffer's {seg_elems} per segment")
    if n == 0:
        return out
    block = block_for(n, x.dtype)
    grid = (triton.cdiv(n, block),)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    _lamport_all_reduce_kernel[grid](
        x, out, peer_ptrs, state, rank, n, seg_elems, timeout_ns,
        WORLD=world, BLOCK=block, SENTINEL=SENTINELS[x.dtype], USE_ASM=not interpreted,
        num_warps=4 if block * x.element_size() <= 8192 else 8,
    )  # fmt: skip
    if interpreted and int(state[1]) < 0:
        raise RuntimeError(
            f"lamport all-reduce: rank {rank} waited {INTERPRETER_SPINS.value} spins for a peer's data"
        )
    return out
