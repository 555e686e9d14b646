"""The `speculative:` section of fxllm's configuration (docs/speculative.md) and its value checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fxllm.config_types import check_non_negative, check_on_off, check_positive, check_rate, one_of

SPECULATIVE_METHODS = ("none", "ngram", "draft_model", "self_draft", "eagle3")


@dataclass
class SpeculativeConfig:
    """Speculative decoding (docs/speculative.md): a proposer drafts tokens, one forward verifies them."""

    method: str = "none"  # none | ngram | draft_model | self_draft | eagle3
    num_speculative_tokens: int = 4  # drafts per sequence and step (k); a verify step runs 1 + k tokens
    prompt_lookup_min: int = 2  # ngram: shortest suffix n-gram matched against the earlier tokens
    prompt_lookup_max: int = 4  # ngram: longest one (tried first)
    model: str | None = None  # draft_model / eagle3: the drafter (same tokenizer as the target)
    draft_layers: int = 4  # self_draft: the target's first layers that draft (plus its final norm and head)
    # A step with more decoding sequences than this does not speculate (verification of many rows costs
    # more than it saves); 0 = never limit.
    disable_batch_size: int = 32
    # A sequence whose acceptance over a window of `min_acceptance_window` drafted tokens is below this
    # drafts nothing for `backoff_tokens` of its tokens, doubled per further backoff up to
    # `backoff_max_tokens` (0 = never). With a drafter that keeps per-sequence state (EAGLE-3's head KV) the
    # first backoff lasts for the rest of the request.
    min_acceptance_rate: float = 0.2
    min_acceptance_window: int = 24
    backoff_tokens: int = 16
    backoff_max_tokens: int = 256
    # on | off: per step, speculate only when the expected tokens per second with it (measured verify and
    # decode step times per batch bucket, each sequence's accepted drafts per verify step) beat plain
    # decoding by `auto_margin`; every `auto_explore_interval` steps of a bucket re-measure the other kind.
    auto_disable: str | bool = "on"
    auto_margin: float = 0.1
    auto_explore_interval: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.auto_disable, bool):  # YAML reads `auto_disable: on` as true
            self.auto_disable = "on" if self.auto_disable else "off"
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"config: speculative.prompt_lookup_min={self.prompt_lookup_min} is larger than "
                f"speculative.prompt_lookup_max={self.prompt_lookup_max}; lower the min or raise the max"
            )
        if self.method in ("draft_model", "eagle3") and not self.model:
            raise ValueError(
                f"config: speculative.method={self.method} needs speculative.model (the drafter)"
            )


SPECULATIVE_VALUE_CHECKS: dict[str, Callable[[Any], None]] = {
    "speculative.method": one_of(*SPECULATIVE_METHODS),
    "speculative.num_speculative_tokens": check_positive,
    "speculative.prompt_lookup_min": check_positive,
    "speculative.prompt_lookup_max": check_positive,
    "speculative.draft_layers": check_positive,
    "speculative.disable_batch_size": check_non_negative,
    "speculative.min_acceptance_rate": check_rate,
    "speculative.min_acceptance_window": check_positive,
    "speculative.backoff_tokens": check_positive,
    "speculative.backoff_max_tokens": check_positive,
    "speculative.auto_disable": check_on_off,
    "speculative.auto_margin": check_non_negative,
    "speculative.auto_explore_interval": check_positive,
}
