"""Per-request sampling parameters, with vLLM-compatible names, defaults and validation."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fxllm.runtime.stop_matcher import StopMatcher

MAX_N = 128
MAX_LOGPROBS = 20


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `top_k=True` is almost certainly a client bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


class RequestOutputKind(enum.Enum):
    """What each output of a request carries (vLLM's names)."""

    CUMULATIVE = 0  # everything so far, every step: O(length) per step, what `LLM.generate` users read
    DELTA = 1  # only what is new since the request's previous output (streams)
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    """How to sample one request: vLLM-compatible field names, defaults and ranges."""

    n: int = 1
    max_tokens: int | None = 16  # None = until the context length (the engine resolves it)
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None = none; k >= 0 = the sampled token's logprob plus the top-k
    # None = none; k >= 0 = per prompt token (the first: None) its logprob plus the top-k. The prompt is then
    # computed in full, never read from the prefix cache (as vLLM does): every position needs its logits.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        """Normalise `stop` / `stop_token_ids` and validate every field (ValueError naming the field)."""
        # OpenAI clients send `stop` as a string, a list, or null.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, Sequence):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, Sequence) and not isinstance(self.stop_token_ids, str):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(
                f"stop_token_ids must be a list of ints, got {type(self.stop_token_ids).__name__}"
            )
        if isinstance(self.output_kind, str) and self.output_kind.upper() in RequestOutputKind.__members__:
            self.output_kind = RequestOutputKind[self.output_kind.upper()]
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"an int in [1, {MAX_N}]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "None or an int >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite float >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a float in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "-1 or 0 (off) or an int >= 1")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a float in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "None or an int")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a float > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, "a float in [-2, 2]")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of ints >= 0")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"None or an int in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise bad("prompt_logprobs", f"None or an int in [0, {MAX_LOGPROBS}]")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", "a RequestOutputKind (or its name: cumulative, delta, final_only)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Build from a mapping (e.g. a request body); unknown keys raise ValueError."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                raise ValueError(f"unknown sampling field {key!r}; known fields: {', '.join(known)}")
        return cls(**d)

    @property
    def has_penalties(self) -> bool:
        """Whether any repetition / presence / frequency penalty is on (they read token history)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def is_greedy(self) -> bool:
        """True when the request asks for argmax decoding."""
        return self.temperature == 0

    @property
    def top_k_enabled(self) -> bool:
        """True when top-k truncation is on (top_k >= 1)."""
        return self.top_k > 0

    @property
    def max_stop_len(self) -> int:
        """Length of the longest stop string (0 when there are none)."""
        return max((len(s) for s in self.stop), default=0)

    @functools.cached_property
    def stop_matcher(self) -> StopMatcher | None:
        """One automaton over `stop` (None without stops), shared by the request's sequences.

        Built on first use, where the request is built (the caller's thread), not per token; `stop` must
        not change after that.
        """
        from fxllm.runtime.stop_matcher import stop_matcher_for

        return stop_matcher_for(tuple(self.stop)) if self.stop else None

    @functools.cached_property
    def stop_token_set(self) -> frozenset[int]:
        """`stop_token_ids` as a set: one lookup per token however long the list (must not change after)."""
        return frozenset(self.stop_token_ids)
