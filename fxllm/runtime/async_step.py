"""A launched engine step whose sampled ids may still be on their way to the host (async scheduling).

With async scheduling the engine launches step N+1 before it reads step N's sampled ids: while the GPU
runs step N+1 the host appends step N's tokens, detokenizes and checks stops. Sequences that sampled at
step N carry a placeholder token (PENDING_TOKEN) only while step N+1 is scheduled and built; its input
id is copied on the device from step N's sampled ids. A sequence that step N finishes has already run
one more token in step N+1: that row is dropped when step N+1 is read, and its KV blocks were freed
when it finished, so the user never sees it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fxllm.runtime.request import Request, SequenceState
from fxllm.runtime.sampler import PendingSample
from fxllm.runtime.scheduler import ScheduledSequence
from fxllm.runtime.sequence import Sequence
from fxllm.runtime.step_inputs import PENDING_TOKEN


@dataclass
class LaunchedStep:
    """One step on the device: what ran, which rows sample, and their result in flight."""

    scheduled: list[ScheduledSequence]
    rows: list[tuple[Request, SequenceState]]  # the sampling rows, in the order of `sample`'s ids
    sample: PendingSample | None
    launched_at: float = field(default_factory=time.perf_counter)  # host clock when sampling was enqueued
    # CUDA only: timing events around the step's device work; the gap between one step's `done` and the
    # next step's `start` on the GPU timeline is time the GPU sat idle waiting for the host.
    start: torch.cuda.Event | None = None
    done: torch.cuda.Event | None = None
    previous_done: torch.cuda.Event | None = None  # the step before's `done`, when the engine kept running

    @staticmethod
    def alive(state: SequenceState) -> bool:
        """Whether a row's sequence still wants its token (not finished or aborted since the launch)."""
        return state.finish_reason is None

    def pending_rows(self) -> dict[int, int]:
        """seq_id -> row in the sampled ids, for the rows whose sequences are still alive."""
        return {state.seq.seq_id: j for j, (_, state) in enumerate(self.rows) if self.alive(state)}

    def needs_host_history(self) -> bool:
        """Whether a live row uses penalties: the sampler reads their token history on the host."""
        return any(request.params.has_penalties and self.alive(state) for request, state in self.rows)

    def add_placeholders(self) -> list[Sequence]:
        """Append PENDING_TOKEN to every live row's sequence (so the scheduler sees one uncomputed token).

        A sequence whose pending token is its last by max_tokens gets none: it is not scheduled again, so
        length-limited sequences run no extra token and take no extra KV slot."""
        seqs = [
            state.seq
            for _, state in self.rows
            if self.alive(state) and state.seq.num_output_tokens + 1 < state.max_tokens
        ]
        for seq in seqs:
            seq.token_ids.append(PENDING_TOKEN)
        return seqs


def remove_placeholders(seqs: list[Sequence]) -> None:
    """Undo `add_placeholders` once the next step is launched: token_ids hold known tokens only."""
    for seq in seqs:
        if seq.token_ids[-1] != PENDING_TOKEN:
            raise RuntimeError(f"sequence {seq.seq_id} lost its pending-token placeholder; this is a bug")
        seq.token_ids.pop()


def timing_event(device: torch.device) -> torch.cuda.Event | None:
    """A recorded CUDA timing event on `device`'s current stream, or None off CUDA."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
