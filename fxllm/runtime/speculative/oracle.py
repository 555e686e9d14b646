"""An oracle proposer for measuring the machinery: drafts are a known continuation of each prompt.

With the target's own greedy continuation (computed first without speculation) every draft of a greedy
request is accepted, so a benchmark sees the best case of verification (issue 16's H100 numbers); with
sampling, drafts are accepted where the sampled run still follows the continuation (the statistical test).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC

from fxllm.runtime.sequence import Sequence


class OracleProposer:
    """Drafts the next tokens of a fixed continuation while a sequence's output follows it."""

    def __init__(self, continuations: Mapping[tuple[int, ...], SequenceABC[int]]) -> None:
        """`continuations` maps a prompt's token ids to the output tokens to draft."""
        self.continuations = {tuple(k): list(v) for k, v in continuations.items()}

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Per sequence the continuation's next `limit` tokens, [] once its output left the continuation."""
        drafts = []
        for seq, limit in zip(seqs, limits):
            follow = self.continuations.get(tuple(seq.token_ids[: seq.num_prompt_tokens]), [])
            done = seq.num_output_tokens
            on_path = follow[:done] == seq.token_ids[seq.num_prompt_tokens :]
            drafts.append(follow[done : done + limit] if on_path else [])
        return drafts
