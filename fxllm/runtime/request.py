"""A request's state in the engine: its sequences, detokenizers, RNGs, logprobs and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fxllm.runtime.detokenizer import IncrementalDetokenizer
from fxllm.runtime.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from fxllm.runtime.sampler import SamplingRow
from fxllm.runtime.sampling_params import RequestOutputKind, SamplingParams
from fxllm.runtime.sequence import Sequence


@dataclass
class SequenceState:
    """Per output sequence: the scheduled Sequence plus what only the engine tracks."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None
    max_tokens: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    last_token_time: float | None = None
    # What DELTA outputs have handed out so far: tokens, characters of text, the finish reason.
    sent_tokens: int = 0
    sent_chars: int = 0
    sent_finish: bool = False
    # The sampler's row when it needs no token history (no penalties, no min_tokens): built once.
    sampling_row: SamplingRow | None = None

    def sampler_row(self, params: SamplingParams) -> SamplingRow:
        """This sequence's row of the sampler's batch. The sampler reads the token history only for
        penalties and min_tokens (its length): copying it every step would cost O(length) per token, and
        without either the row never changes, so it is built once."""
        if self.sampling_row is not None:
            return self.sampling_row
        seq, penalized = self.seq, params.has_penalties
        prompt_ids = seq.token_ids[: seq.num_prompt_tokens] if penalized else []
        output_ids = seq.output_token_ids if penalized or params.min_tokens > 0 else []
        row = SamplingRow(params, self.generator, prompt_ids, output_ids)
        if not penalized and params.min_tokens == 0:
            self.sampling_row = row
        return row

    @property
    def num_text_chars(self) -> int:
        """Characters of text that are safe to show (a stop string can no longer cut them)."""
        return 0 if self.detokenizer is None else self.detokenizer.num_emitted

    def text(self, start: int = 0) -> str:
        """The text safe to show, from character `start` on."""
        det = self.detokenizer
        return "" if det is None else det.text[start : det.num_emitted]


@dataclass
class Request:
    """One user request; n > 1 gives it several sequences over the same prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    states: list[SequenceState]
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.monotonic()))
    # SamplingParams.prompt_logprobs: per prompt token (the first: None), filled as the prompt is computed.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    sent_prompt_logprobs: bool = False  # DELTA: handed out with the first output

    @property
    def finished(self) -> bool:
        """True once every sequence has a finish reason."""
        return all(s.finish_reason is not None for s in self.states)

    def output(self) -> RequestOutput:
        """The request's output, of the kind its params ask for (only text that is safe to show).

        CUMULATIVE and FINAL_ONLY: a snapshot of everything so far (O(length) copies). DELTA: what is new
        since the previous call, and only the sequences with news; calling it marks that as handed out.
        """
        if self.params.output_kind is RequestOutputKind.DELTA:
            return self._delta_output()
        outputs = [
            CompletionOutput(
                index=i,
                text=s.text(),
                token_ids=list(s.seq.output_token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            )
            for i, s in enumerate(self.states)
        ]
        prompt_logprobs = list(self.prompt_logprobs) if self.prompt_logprobs is not None else None
        return RequestOutput(
            self.request_id, self.prompt, list(self.prompt_token_ids), outputs, self.finished, self.metrics,
            prompt_logprobs,
        )  # fmt: skip

    def _delta_output(self) -> RequestOutput:
        # O(new tokens) per sequence: slices past what was sent, no copy of the prompt or of the history.
        outputs = []
        for i, s in enumerate(self.states):
            seq = s.seq
            num_tokens, num_chars = seq.num_output_tokens, s.num_text_chars
            report_finish = s.finish_reason is not None and not s.sent_finish
            if num_tokens == s.sent_tokens and num_chars == s.sent_chars and not report_finish:
                continue
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=s.text(s.sent_chars),
                    token_ids=seq.token_ids[seq.num_prompt_tokens + s.sent_tokens :],
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    logprobs=s.logprobs[s.sent_tokens :] if s.logprobs is not None else None,
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                )
            )
            s.sent_tokens, s.sent_chars, s.sent_finish = num_tokens, num_chars, s.finish_reason is not None
        # The prompt ids are shared, not copied: the engine never changes them after the request is built.
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.sent_prompt_logprobs and outputs:
            # Complete by the first output: a sequence samples only once its prompt is computed.
            prompt_logprobs, self.sent_prompt_logprobs = self.prompt_logprobs, True
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished, self.metrics,
            prompt_logprobs,
        )  # fmt: skip
