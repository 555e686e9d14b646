"""Rank 0 -> workers: commands over pipes (never blocking on a dead peer), step tensors over the group.

A command is a small tuple sent on each worker's pipe. A step's inputs follow as one int64 buffer
broadcast from rank 0 over the process group (NCCL on CUDA: the input ids may still be in flight on
rank 0's device under async scheduling, and stay there), which each worker splits back by the shapes
the command carried.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from fxllm.runtime.step_inputs import StepInputs

STEP_FIELDS: tuple[str, ...] = (
    "input_ids", "position_ids", "slot_mapping", "block_tables", "seq_lens", "query_start_loc", "logits_indices",
)  # fmt: skip


class PeerGone(RuntimeError):
    """The other end of a pipe exited or closed it."""


StepHeader = tuple[list[tuple[tuple[int, ...], str]], dict[str, list[Any]]]


def step_header(inputs: StepInputs) -> StepHeader:
    """Shape and dtype of each step tensor (STEP_FIELDS order), and the step's host-side lists (sampled
    rows, prompt-logprob rows, draft counts): the CUDA-graph buckets' test reads them, so with them every
    rank takes the same path and pads a verify step the same way, and the collectives' sizes agree."""
    shapes = [
        (tuple(getattr(inputs, f).shape), str(getattr(inputs, f).dtype).removeprefix("torch."))
        for f in STEP_FIELDS
    ]
    lists = {"sampled": list(inputs.sampled), "prompt_rows": [tuple(r) for r in inputs.prompt_rows],
             "draft_counts": list(inputs.draft_counts)}  # fmt: skip
    return shapes, lists


def broadcast_step(inputs: StepInputs) -> None:
    """Rank 0: send the step tensors to every rank (one collective)."""
    packed = torch.cat([getattr(inputs, f).reshape(-1).to(torch.int64) for f in STEP_FIELDS])
    dist.broadcast(packed, src=0)


def receive_step(header: StepHeader, device: torch.device) -> StepInputs:
    """A worker: the step tensors rank 0 broadcast, with the shapes and dtypes of `header`."""
    shapes, lists = header
    sizes = [int(torch.Size(shape).numel()) for shape, _ in shapes]
    packed = torch.empty(sum(sizes), dtype=torch.int64, device=device)
    dist.broadcast(packed, src=0)
    # Each field a tensor of its own (copy=True), never a view of `packed`: Dynamo guards a view input on
    # its base, so views here (rank 0's inputs and the decode graphs' buffers are not views) made the
    # workers alone recompile the whole graph, during CUDA-graph capture and again for later steps.
    tensors = {
        name: part.view(shape).to(getattr(torch, dtype), copy=True)
        for name, part, (shape, dtype) in zip(STEP_FIELDS, packed.split(sizes), shapes)
    }
    return StepInputs(**tensors, **lists)


def receive(conn: Connection, *, alive: Any, timeout_s: float | None, what: str) -> Any:
    """The next message on `conn`, polling so that a dead peer (`alive()` False) or `timeout_s` raises."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not conn.poll(0.2):
        if not alive():
            raise PeerGone(f"{what}: the other process exited")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no answer in {timeout_s:.0f} s")
    try:
        return conn.recv()
    except (EOFError, OSError) as exc:
        raise PeerGone(f"{what}: the other process closed its pipe ({exc})") from exc


def parent_alive(parent_pid: int) -> bool:
    """Whether the process that spawned this one still runs (a worker is re-parented when it dies)."""
    return os.getppid() == parent_pid
