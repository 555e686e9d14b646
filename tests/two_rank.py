"""Shared by the Lamport kernel tests: two ranks simulated in one process, under Triton's interpreter on the CPU.

Two buffers, each rank's kernel given both addresses. A call of rank 1 "that already ran its send" is a copy of
its input's bits into its segment of rank 0's buffer; rank 0's kernel then runs whole (its clear, its sends into
both buffers, its wait, its sum), then rank 1's. Import this module before the kernels' modules and call
`interpret_on_cpu()` first, so that they are imported as interpreted functions.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WORLD = 2
SEG = 4096  # elements per segment: messages up to 4096 elements, 4 programs of 1024 at most (bf16)
TIMEOUT_NS = 10**10


def interpret_on_cpu() -> None:
    """Without a GPU, have Triton run kernels in its interpreter (before the kernels' modules are imported)."""
    if DEVICE == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreted(modules: Sequence[ModuleType], kernels: Sequence[Any]) -> list[ModuleType]:
    """`modules`, with the interpreter's helpers patched in on the CPU, and re-imported in the order given where
    `kernels` were imported as GPU kernels before TRITON_INTERPRET=1 was set (a module that binds the others'
    helpers by name goes last). Unchanged on a GPU."""
    if DEVICE != "cpu":
        return list(modules)
    from triton.runtime.interpreter import InterpretedFunction

    import fxllm.backends.triton as tb

    tb.patch_interpreter()
    if all(isinstance(kernel, InterpretedFunction) for kernel in kernels):
        return list(modules)
    return [importlib.reload(module) for module in modules]


class TwoRanks:
    """Two ranks' Lamport buffers (3 slots x WORLD segments of `seg` elements, all the sentinel at first), their
    pointer table and their slot states, in one process."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, seg: int = SEG) -> None:
        from fxllm.backends.triton import lamport_all_reduce as lamport

        self.lamport = lamport
        self.dtype, self.seg = dtype, seg
        self.sentinel, self.int_type = lamport.SENTINELS[dtype], lamport.INT_TYPES[dtype]
        self.buffers = [
            torch.full((3 * WORLD * seg,), self.sentinel, dtype=self.int_type, device=DEVICE)
            for _ in range(WORLD)
        ]
        self.ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64, device=DEVICE)
        self.states = [lamport.new_state(torch.device(DEVICE)) for _ in range(WORLD)]

    def segment(self, owner: int, slot: int, writer: int, n: int) -> torch.Tensor:
        """Segment `writer` of slot `slot` in rank `owner`'s buffer, first n elements."""
        start = (slot * WORLD + writer) * self.seg
        return self.buffers[owner][start : start + n]

    def presend(self, x: torch.Tensor) -> None:
        """Rank 1's send of its next call into rank 0's buffer, as if rank 1 ran ahead (-0.0 sent as +0.0)."""
        bits = x.reshape(-1).view(self.int_type)
        sent = torch.where(bits == self.sentinel, torch.zeros_like(bits), bits)
        self.segment(0, int(self.states[1][0]), 1, bits.numel()).copy_(sent)

    def run(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        """Rank `rank`'s plain all-reduce of `x` (the output starts as NaN: every element must be written)."""
        out = torch.full_like(x, float("nan"))
        self.lamport.lamport_all_reduce(
            x, out, self.ptrs, self.states[rank], rank, WORLD, self.seg, TIMEOUT_NS
        )
        return out

    def call(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One all-reduce: rank 1's send lands first (as if it ran ahead), then each rank's kernel runs."""
        self.presend(xs[1])
        return [self.run(0, xs[0]), self.run(1, xs[1])]

    def slot_is_clear(self, owner: int, slot: int) -> bool:
        """Whether slot `slot` of rank `owner`'s buffer is the sentinel everywhere."""
        start = slot * WORLD * self.seg
        chunk = self.buffers[owner][start : start + WORLD * self.seg]
        return bool((chunk == self.sentinel).all())
