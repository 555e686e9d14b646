"""What the engine hands back per request: vLLM-shaped output dataclasses.

With `RequestOutputKind.DELTA` an output's text, token ids and logprobs are only what is new since the
request's previous output (and `outputs` lists only the sequences with news); `RequestOutput.add` folds
such deltas together. Otherwise they hold everything so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class Logprob:
    """The log-probability of one token, optionally with its decoded text."""

    token_id: int
    logprob: float
    decoded: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has several)."""

    index: int
    text: str  # all text so far, or (DELTA) the new text
    token_ids: list[int]  # all generated ids so far, or (DELTA) the new ones
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Per generated token (DELTA: per new token): {token_id: Logprob}, the sampled token and the top-k.
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        """True once the sequence has a finish reason."""
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic() seconds, or whatever clock the engine uses) of one request."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)
    # Speculative decoding (all sequences of the request): verify steps, drafted and accepted tokens.
    spec_verify_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens, or None when nothing was drafted."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None

    @property
    def spec_mean_accepted_length(self) -> float | None:
        """Tokens a verify step appended on average (accepted drafts + the corrected or bonus token)."""
        if not self.spec_verify_steps:
            return None
        return (self.spec_accepted_tokens + self.spec_verify_steps) / self.spec_verify_steps

    @property
    def ttft(self) -> float | None:
        """Time to first token in seconds, or None before the first token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        """Arrival-to-finish time in seconds, or None while running."""
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """The state of one request after an engine step: its prompt and every output sequence."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]  # DELTA outputs share the request's list: read it, do not change it
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # SamplingParams.prompt_logprobs: per prompt token {token_id: Logprob} (its own and the top-k), the first
    # None, as vLLM. DELTA outputs carry it once, with the first output.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def add(self, later: RequestOutput) -> None:
        """Fold a later DELTA output of the same request into this one (in place), as vLLM's `add` does.

        Text, token ids and logprobs are appended per sequence index; finish and stop reasons and the
        cumulative logprob are taken from `later`, which is left unchanged (nothing of it is shared).
        This output's own lists grow in place: DELTA outputs own theirs.
        """
        if later.request_id != self.request_id:
            raise ValueError(f"cannot add outputs of request {later.request_id!r} to {self.request_id!r}")
        mine = {c.index: c for c in self.outputs}
        for c in later.outputs:
            into = mine.get(c.index)
            if into is None:  # a copy: `later` stays as it was
                logprobs = list(c.logprobs) if c.logprobs is not None else None
                self.outputs.append(replace(c, token_ids=list(c.token_ids), logprobs=logprobs))
                continue
            into.text += c.text
            into.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                if into.logprobs is None:
                    into.logprobs = []
                into.logprobs.extend(c.logprobs)
            into.finish_reason, into.stop_reason = c.finish_reason, c.stop_reason
            into.cumulative_logprob = c.cumulative_logprob
        self.outputs.sort(key=lambda c: c.index)
        self.finished = later.finished
        self.metrics = later.metrics if later.metrics is not None else self.metrics
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
