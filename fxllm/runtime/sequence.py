"""Per-request state shared by the scheduler, the KV-cache manager and the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    """Lifecycle state of a sequence."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        """Whether the sequence reached a terminal state."""
        return self in _FINISHED


_FINISHED = frozenset(
    {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED}
)


# eq=False: sequences are identities (used as dict keys / compared with `is`), not values.
@dataclass(eq=False)
class Sequence:
    """One generation request: its tokens, progress through the KV cache and its block table."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int
    arrival_time: float
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    priority: int = 0
    reuse_prefix_cache: bool = True  # False: compute every prompt token (prompt logprobs need their logits)
    # Speculative decoding: tokens drafted for this step, verified after the last known token. They are
    # not in token_ids (nothing else sees them); the engine clears them once the step is verified.
    draft_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(
                f"Sequence {self.seq_id}: num_prompt_tokens={self.num_prompt_tokens} must be between 1 and "
                f"len(token_ids)={len(self.token_ids)}; pass a non-empty prompt."
            )
        if self.max_tokens < 1:
            raise ValueError(
                f"Sequence {self.seq_id}: max_tokens={self.max_tokens} must be >= 1; "
                "resolve a default before creating the sequence."
            )

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Number of generated tokens so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens so far (a copy)."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        """Most recent token (the next decode input)."""
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V are not yet in the cache."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def max_num_tokens(self) -> int:
        """Upper bound on the sequence length: prompt plus max_tokens."""
        return self.num_prompt_tokens + self.max_tokens

    def append_token(self, token_id: int) -> None:
        """Append one sampled token."""
        self.token_ids.append(token_id)
