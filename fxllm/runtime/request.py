"""A request's state in the engine: its sequences, detokenizers, RNGs, logprobs and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fxllm.runtime.detokenizer import IncrementalDetokenizer
from fxllm.runtime.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.sequence import Sequence


@dataclass
class SequenceState:
    """Per output sequence: the scheduled Sequence plus what only the engine tracks."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    max_tokens: int
    streamed_text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    last_token_time: float | None = None


@dataclass
class Request:
    """One user request; n > 1 gives it several sequences over the same prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    states: list[SequenceState]
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.monotonic()))

    @property
    def finished(self) -> bool:
        """True once every sequence has a finish reason."""
        return all(s.finish_reason is not None for s in self.states)

    def output(self) -> RequestOutput:
        """A snapshot of the request, text cumulative (only what is safe to show)."""
        outputs = [
            CompletionOutput(
                index=i,
                text=s.streamed_text,
                token_ids=list(s.seq.output_token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            )
            for i, s in enumerate(self.states)
        ]
        return RequestOutput(
            self.request_id, self.prompt, list(self.prompt_token_ids), outputs, self.finished, self.metrics
        )
