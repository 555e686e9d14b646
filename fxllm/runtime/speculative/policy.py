"""When to speculate (issue 16, scope 5): a cost model per step and an acceptance backoff per sequence.

Per step (`StepCostModel`): running estimates (EMA) of the wall time of a plain decode step and of a verify
step per batch-size bucket (powers of two), and per sequence (`SequencePolicy.accepted_ema`) the mean
number of drafts accepted per verify step. A step speculates when the expected tokens per second with
speculation, sum(1 + accepted) / verify time, beats plain decoding, batch / decode time, by
`speculative.auto_margin`. Every `speculative.auto_explore_interval` steps of a bucket without a sample of
the other kind run that kind anyway, so neither estimate goes stale. Only steps of decodes alone are timed
(a prefill chunk would make the step time say nothing about either kind).

Per sequence: over each window of `speculative.min_acceptance_window` drafted tokens, an acceptance below
`speculative.min_acceptance_rate` stops drafting for that sequence for `speculative.backoff_tokens` of its
tokens, doubled on every further backoff up to `speculative.backoff_max_tokens`.

Both only change WHEN a sequence drafts; verification keeps every output what plain decoding gives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

EMA_ALPHA = 0.2  # weight of a new step time: ~5 steps of memory, enough to follow a load change
# Weight of a verify step's accepted count in a sequence's estimate. Acceptance moves in stretches (a copied
# passage, then an edited one): on SmolLM2's type-hints prompt n-gram accepted 4, then 0 seven times; at 0.3
# the estimate falls below break-even after 3-4 such steps (0.2 took 6-7 of its 8).
ACCEPT_ALPHA = 0.3
MIN_SAMPLES = 2  # samples of both kinds a bucket needs before the cost rule decides
OUTLIER_FACTOR = 4.0  # a step this much slower than the estimate is skipped (a compile, a GC pause) ...
MAX_OUTLIERS = 2  # ... unless it happens more than this many times in a row (then the cost really moved)


def ema(previous: float | None, sample: float, alpha: float = EMA_ALPHA) -> float:
    """The running estimate after `sample` (the sample itself when there was none)."""
    return sample if previous is None else previous + alpha * (sample - previous)


def batch_bucket(batch: int) -> int:
    """The power of two at or above `batch`: steps of similar width share an estimate."""
    return 1 << max(0, batch - 1).bit_length()


@dataclass
class CostEstimate:
    """EMA of one step kind's wall seconds in one batch bucket."""

    seconds: float = 0.0
    samples: int = 0
    since: int = 0  # timed steps of this bucket since this kind's last sample
    outliers: int = 0  # consecutive samples skipped as outliers

    def add(self, seconds: float) -> None:
        """Fold one step's time in."""
        if self.samples and seconds > OUTLIER_FACTOR * self.seconds and self.outliers < MAX_OUTLIERS:
            self.outliers += 1
            return
        if not self.samples or seconds < self.seconds / 2:
            # First sample, or far faster than the estimate: the estimate held a slow start (compile,
            # cold caches); an EMA would take dozens of samples to forget it.
            self.seconds = seconds
        else:
            self.seconds += EMA_ALPHA * (seconds - self.seconds)
        self.samples += 1
        self.since = self.outliers = 0


@dataclass
class Decision:
    """What one step does: speculate or not, and why (for the counters)."""

    speculate: bool
    reason: str  # "cost" (the rule), "warmup" (too few samples), "explore" (against the rule, to re-measure)
    expected_gain: float | None = None  # tok/s with speculation / tok/s without (None while warming up)


class StepCostModel:
    """Per batch bucket: plain and verify step times, and the decision of each step."""

    def __init__(self, margin: float, explore_interval: int) -> None:
        self.margin = margin
        self.explore_interval = explore_interval
        self.plain: dict[int, CostEstimate] = {}
        self.verify: dict[int, CostEstimate] = {}
        self._on: dict[int, bool] = {}  # the rule's last verdict per bucket (to log changes)
        self.num_flips = 0

    def decide(self, batch: int, expected_tokens: float) -> Decision:
        """Speculate on a step of `batch` decodes that would produce `expected_tokens` when verifying?"""
        key = batch_bucket(batch)
        plain = self.plain.setdefault(key, CostEstimate())
        verify = self.verify.setdefault(key, CostEstimate())
        if plain.samples < MIN_SAMPLES or verify.samples < MIN_SAMPLES:
            return Decision(verify.samples <= plain.samples, "warmup")  # alternate until both are known
        gain = (expected_tokens / verify.seconds) / (batch / plain.seconds)
        on = gain >= 1 + self.margin
        if self._on.get(key) != on:
            self._log_flip(key, on, gain, plain, verify, expected_tokens / batch)
        self._on[key] = on
        if on and plain.since >= self.explore_interval:
            return Decision(False, "explore", gain)
        if not on and verify.since >= self.explore_interval:
            return Decision(True, "explore", gain)
        return Decision(on, "cost", gain)

    def record(self, batch: int, verified: bool, seconds: float) -> None:
        """One timed step of `batch` decodes (verifying drafts or not) took `seconds`."""
        key = batch_bucket(batch)
        plain = self.plain.setdefault(key, CostEstimate())
        verify = self.verify.setdefault(key, CostEstimate())
        sampled, other = (verify, plain) if verified else (plain, verify)
        sampled.add(seconds)
        other.since += 1

    def _log_flip(self, key: int, on: bool, gain: float, plain: CostEstimate, verify: CostEstimate,
                  tokens_per_seq: float) -> None:  # fmt: skip
        self.num_flips += 1
        # Powers of two: a bucket near the break-even point flips often; the log grows with its logarithm.
        level = logging.INFO if self.num_flips & (self.num_flips - 1) == 0 else logging.DEBUG
        logger.log(
            level, "speculation %s for steps of <= %d decodes: expected %.2fx tok/s (%.2f tokens per sequence "
            "per verify step of %.2f ms vs a decode step of %.2f ms; margin %.2f); %d changes so far",
            "on" if on else "off (cost)", key, gain, tokens_per_seq, verify.seconds * 1e3, plain.seconds * 1e3,
            self.margin, self.num_flips,
        )  # fmt: skip


@dataclass
class SequencePolicy:
    """One sequence's acceptance history and backoff."""

    accepted_ema: float | None = None  # drafts accepted per verify step (EMA)
    window_drafted: int = 0
    window_accepted: int = 0
    backoff_until: int = 0  # drafts nothing while its output is shorter than this
    backoff_tokens: int = 0  # the length of the last backoff (doubles each time)
    num_backoffs: int = 0

    def backed_off(self, num_output_tokens: int) -> bool:
        """Whether the sequence is in a backoff now."""
        return num_output_tokens < self.backoff_until

    def observe(self, drafted: int, accepted: int, rate: float, window: int) -> bool:
        """Count one verify step; True when the window just closed below `rate` (the caller backs off)."""
        self.accepted_ema = ema(self.accepted_ema, float(accepted), ACCEPT_ALPHA)
        self.window_drafted += drafted
        self.window_accepted += accepted
        if rate <= 0 or self.window_drafted < window:
            return False
        low = self.window_accepted < rate * self.window_drafted
        self.window_drafted = self.window_accepted = 0  # tumbling windows: after a backoff it starts afresh
        return low

    def back_off(self, num_output_tokens: int, first: int, most: int) -> int:
        """Start a backoff at `num_output_tokens`; returns its length in tokens."""
        self.backoff_tokens = min(most, 2 * self.backoff_tokens) if self.num_backoffs else first
        self.backoff_until = num_output_tokens + self.backoff_tokens
        self.num_backoffs += 1
        return self.backoff_tokens
