"""The engine's speculative-decoding hooks: draft before scheduling, verify after the forward, append runs.

One step with speculation: `propose` gives each eligible decoding sequence up to k drafted tokens
(Sequence.draft_token_ids); the scheduler schedules such a decode as 1 + k tokens; build_step_inputs lays
the drafts after the last known token and asks for 1 + k logits rows; `launch` verifies them by rejection
sampling (rows without drafts go through the normal sampler); the engine rolls num_computed_tokens back to
the known tokens (`rollback_drafts`) and `append_run` appends the accepted run one token at a time, so
stop strings, stop tokens and max_tokens cut it where plain decoding would have stopped. KV entries of
rejected drafts stay in the sequence's blocks past num_computed_tokens: they are overwritten later and
never hashed into the prefix cache (cache_full_blocks only hashes computed tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fxllm.config import SpeculativeConfig
from fxllm.runtime.cuda_graphs import verify_query_lens
from fxllm.runtime.outputs import Logprob
from fxllm.runtime.request import Request, SequenceState
from fxllm.runtime.sampler import PendingSample, Sampler, SamplingRow
from fxllm.runtime.scheduler import ScheduledSequence
from fxllm.runtime.sequence import Sequence
from fxllm.runtime.speculative.rejection import greedy_run, is_greedy, verify_sequence

if TYPE_CHECKING:
    from fxllm.runtime.engine import Engine

logger = logging.getLogger(__name__)


class Proposer(Protocol):
    """Drafts tokens for a batch of decoding sequences."""

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Per sequence at most `limits[i]` drafted ids continuing its token_ids (may be empty)."""
        ...


@dataclass
class SpecStats:
    """Engine-wide speculative-decoding counters (/metrics, bench)."""

    verify_steps: int = 0  # sequence-steps that verified at least one draft
    draft_tokens: int = 0
    accepted_tokens: int = 0
    steps_disabled_batch: int = 0  # steps that did not speculate because the batch was too large
    requests_disabled: int = 0  # requests that stopped speculating for low acceptance

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 before any draft)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


@dataclass
class VerifiedRun:
    """The tokens one verify step appends to a sequence, and how many drafts it verified."""

    tokens: list[int]
    num_drafts: int


@dataclass
class VerifiedOutput:
    """Like SamplerOutput: per row an id (plain rows) or a VerifiedRun (rows that verified drafts)."""

    token_ids: list[Any]
    logprobs: list[dict[int, Logprob] | None]


@dataclass
class VerifiedSample:
    """A step's sampling result; verification already ran on the host (speculation is synchronous)."""

    output: VerifiedOutput
    token_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # unused: no async step reads it

    def ready(self) -> bool:
        """Always: the result is on the host."""
        return True

    def resolve(self) -> VerifiedOutput:
        """The verified tokens per row."""
        return self.output


def rollback_drafts(scheduled: list[ScheduledSequence]) -> None:
    """After a launch: verified positions count as computed only up to the known tokens; drop the drafts.

    The accepted drafts' K/V are in place; `append_run` counts them computed as it appends each token."""
    for item in scheduled:
        seq = item.seq
        if seq.draft_token_ids:
            seq.draft_token_ids = []
        if seq.num_computed_tokens > seq.num_tokens:
            seq.num_computed_tokens = seq.num_tokens


class SpeculativeDecoder:
    """Proposes, verifies and appends speculative runs for an Engine (`Engine.speculator`)."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.proposer = proposer
        self.stats = SpecStats()
        self.async_was_on = False  # whether the engine scheduled asynchronously before speculation

    def reset_stats(self) -> None:
        """Forget the counters (after the engine's warm-up)."""
        self.stats = SpecStats()

    # ---- before scheduling --------------------------------------------------------------------
    def propose(self, engine: Engine) -> None:
        """Set draft_token_ids on every eligible decoding sequence (and clear everyone else's)."""
        before_step = getattr(self.proposer, "before_step", None)
        if before_step is not None:  # EAGLE-3: the head reads the previous step's hidden states first
            before_step(engine)
        decoding = [s for s in engine.scheduler.running if s.num_uncomputed_tokens == 1]
        for seq in decoding:
            seq.draft_token_ids = []
        limit = self.config.disable_batch_size
        if limit and len(decoding) > limit:
            self.stats.steps_disabled_batch += 1
            count = self.stats.steps_disabled_batch
            if count == 1 or count % 1000 == 0:
                logger.info(
                    "speculation off for a step of %d decoding sequences (> speculative.disable_batch_size=%d); "
                    "%d such steps so far", len(decoding), limit, count,
                )  # fmt: skip
            return
        seqs, limits = [], []
        for seq in decoding:
            entry = engine._by_seq.get(seq.seq_id)
            if entry is None:
                continue
            request, state = entry
            room = min(self.config.num_speculative_tokens, state.max_tokens - seq.num_output_tokens - 1)
            if room > 0 and self._eligible(request, seq):
                seqs.append(seq)
                limits.append(room)
        if not seqs:
            return
        for seq, drafts in zip(seqs, self.proposer.propose(seqs, limits)):
            seq.draft_token_ids = list(drafts)

    def _eligible(self, request: Request, seq: Sequence) -> bool:
        """Requests whose sampling reads the history per token (penalties, min_tokens) or asks logprobs
        are decoded plainly; so are those whose acceptance stayed low."""
        params = request.params
        if params.has_penalties or params.logprobs is not None or seq.num_output_tokens < params.min_tokens:
            return False
        metrics = request.metrics
        return not self._low_acceptance(metrics.spec_draft_tokens, metrics.spec_accepted_tokens)

    def stopped(self, request: Request) -> bool:
        """Whether `request` will never speculate again (penalties, logprobs, or low acceptance): a drafter
        with per-sequence state (EAGLE-3's head KV) may stop maintaining it."""
        params, metrics = request.params, request.metrics
        return (
            params.has_penalties
            or params.logprobs is not None
            or self._low_acceptance(metrics.spec_draft_tokens, metrics.spec_accepted_tokens)
        )

    def _low_acceptance(self, drafted: int, accepted: int) -> bool:
        rate = self.config.min_acceptance_rate
        return rate > 0 and drafted >= self.config.min_acceptance_window and accepted < rate * drafted

    # ---- after the forward ----------------------------------------------------------------------
    def launch(
        self,
        sampler: Sampler,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        scheduled_seqs: list[Sequence],
        draft_counts: list[int],
    ) -> VerifiedSample:
        """Verify the rows with drafts, sample the others; `logits` has 1 + drafts rows per sequence."""
        starts, offset = [], 0
        for count in draft_counts:
            starts.append(offset)
            offset += 1 + count
        plain = [j for j, count in enumerate(draft_counts) if count == 0]
        token_ids: list[Any] = [None] * len(rows)
        logprobs: list[dict[int, Logprob] | None] = [None] * len(rows)
        if plain:
            index = torch.tensor([starts[j] for j in plain], dtype=torch.int64, device=logits.device)
            pending: PendingSample = sampler.launch(logits.index_select(0, index), [rows[j] for j in plain])
            out = pending.resolve()
            for i, j in enumerate(plain):
                token_ids[j], logprobs[j] = out.token_ids[i], out.logprobs[i]
        # Greedy rows need only the argmax ids: one argmax and one copy to the host for the whole step
        # (per sequence it was a device sync each; a batch-32 verify step paid 32).
        greedy = [j for j, count in enumerate(draft_counts) if count and is_greedy(rows[j].params)]
        best = logits.argmax(dim=-1).tolist() if greedy else []
        for j, count in enumerate(draft_counts):
            if count:
                drafts = scheduled_seqs[j].draft_token_ids[:count]
                if best and is_greedy(rows[j].params):
                    tokens = greedy_run(best[starts[j] : starts[j] + count + 1], drafts)
                else:
                    chunk = logits[starts[j] : starts[j] + count + 1]
                    tokens = verify_sequence(chunk, drafts, rows[j].params, rows[j].generator)
                token_ids[j] = VerifiedRun(tokens, count)
        return VerifiedSample(VerifiedOutput(token_ids, logprobs))

    # ---- reading the step ------------------------------------------------------------------------
    def append_run(self, engine: Engine, request: Request, state: SequenceState, run: VerifiedRun, now: float) -> None:  # fmt: skip
        """Append a verified run token by token until the sequence finishes; count acceptance."""
        metrics, stats = request.metrics, self.stats
        accepted = len(run.tokens) - 1
        was_low = self._low_acceptance(metrics.spec_draft_tokens, metrics.spec_accepted_tokens)
        metrics.spec_verify_steps += 1
        metrics.spec_draft_tokens += run.num_drafts
        metrics.spec_accepted_tokens += accepted
        stats.verify_steps += 1
        stats.draft_tokens += run.num_drafts
        stats.accepted_tokens += accepted
        if not was_low and self._low_acceptance(metrics.spec_draft_tokens, metrics.spec_accepted_tokens):
            stats.requests_disabled += 1
            logger.info(
                "request %s stops speculating: %d of %d drafted tokens accepted (< speculative.min_acceptance_rate"
                "=%.2f); %d requests so far", request.request_id, metrics.spec_accepted_tokens,
                metrics.spec_draft_tokens, self.config.min_acceptance_rate, stats.requests_disabled,
            )  # fmt: skip
        seq = state.seq
        for i, token in enumerate(run.tokens):
            if state.finish_reason is not None:
                break  # a stop inside the accepted run cuts it there
            if i:
                seq.num_computed_tokens = seq.num_tokens  # the previous token's K/V came from the verify step
            engine._append_token(request, state, token, None, now)


class NgramProposer:
    """Prompt lookup over each sequence's own tokens (prompt and output)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Per sequence the continuation of its latest earlier suffix match."""
        from fxllm.runtime.speculative.ngram import propose_ngram

        return [propose_ngram(s.token_ids, k, self.min_n, self.max_n) for s, k in zip(seqs, limits)]


def build_speculator(
    config: SpeculativeConfig, engine: Engine, drafter: Proposer | None = None
) -> SpeculativeDecoder | None:
    """The decoder for `config` attached to `engine` (None for method none); turns async scheduling off.

    `drafter` proposes for the model methods (drafters.build_drafter); ngram needs none."""
    if config.method == "none":
        return None
    if config.method == "ngram":
        proposer: Proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    elif drafter is None:
        raise ValueError(f"speculative.method={config.method} needs a drafter (drafters.build_drafter)")
    else:
        proposer = drafter
    async_was_on = engine.async_scheduling
    if engine.async_scheduling:
        logger.info(
            "speculative decoding (%s) runs synchronous steps: async scheduling is off", config.method
        )
        engine.async_scheduling = False
    logger.info(
        "speculative decoding: method %s, %d tokens per step, off above %d decoding sequences or below %.2f "
        "acceptance", config.method, config.num_speculative_tokens, config.disable_batch_size,
        config.min_acceptance_rate,
    )  # fmt: skip
    # The decode CUDA graphs (captured after this, on a GPU) get verify buckets for every 1 + d, d <= k, up
    # to the batch size that still speculates.
    engine.runner.verify_query_lens = verify_query_lens(config.num_speculative_tokens)
    engine.runner.verify_max_batch = config.disable_batch_size
    speculator = SpeculativeDecoder(config, proposer)
    speculator.async_was_on = async_was_on  # a plain baseline in the same process turns it back on
    engine.speculator = speculator
    return speculator
