"""The server's hooks into the engine's scheduler: one fairness group per HTTP request, and queue times."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

from fxllm.runtime.sequence import Sequence
from fxllm.serve.metrics import ServerMetrics


def http_request_id(engine_request_id: str) -> str:
    """The HTTP request an engine request belongs to: the server names its engine requests `cmpl-<hex>` or
    `chatcmpl-<hex>`, plus `-<i>` for the i-th prompt of a batch (OpenAIServing._start)."""
    return "-".join(engine_request_id.split("-", 2)[:2])


class RequestGroups:
    """A scheduler fairness key: every sequence of one HTTP request (its prompts x n) is one group."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._group_of: dict[int, Hashable] = {}

    def __call__(self, seq: Sequence) -> Hashable:
        """The group of `seq` (runs on the engine thread, inside schedule(), like every engine mutation)."""
        group = self._group_of.get(seq.seq_id)
        if group is None:
            # New sequences arrive in bursts (a request's n x prompts), so one rebuild covers a whole burst.
            self._group_of = {state.seq.seq_id: http_request_id(rid)
                              for rid, request in self._engine.requests.items() for state in request.states}  # fmt: skip
            group = self._group_of.get(seq.seq_id, seq.seq_id)
        return group


def attach_scheduler_hooks(engine: Any, metrics: ServerMetrics) -> Callable[[], None]:
    """Make the scheduler share admission fairly between HTTP requests and report queue times to `metrics`;
    returns the function that puts the previous hooks back."""
    scheduler = engine.scheduler
    previous = scheduler.fairness_key, scheduler.on_admit

    def admitted(seq: Sequence) -> None:
        # The engine stamps arrival_time with time.monotonic() when it builds the request.
        metrics.observe_queue_time(time.monotonic() - seq.arrival_time)

    scheduler.fairness_key = RequestGroups(engine)
    scheduler.on_admit = admitted

    def detach() -> None:
        scheduler.fairness_key, scheduler.on_admit = previous

    return detach
