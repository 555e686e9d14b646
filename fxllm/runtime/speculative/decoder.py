"""The engine's speculative-decoding hooks: draft before scheduling, verify after the forward, append runs.

One step with speculation: `propose` gives each eligible decoding sequence up to k drafted tokens
(Sequence.draft_token_ids); the scheduler schedules such a decode as 1 + k tokens; build_step_inputs lays
the drafts after the last known token and asks for 1 + k logits rows; `launch` verifies them by rejection
sampling (rows without drafts go through the normal sampler); the engine rolls num_computed_tokens back to
the known tokens (`rollback_drafts`) and `append_run` appends the accepted run one token at a time, so
stop strings, stop tokens and max_tokens cut it where plain decoding would have stopped. KV entries of
rejected drafts stay in the sequence's blocks past num_computed_tokens: they are overwritten later and
never hashed into the prefix cache (cache_full_blocks only hashes computed tokens).

When to speculate is policy.py's: per step the cost model (verify vs decode step time, accepted drafts per
verify step), per sequence the acceptance backoff. `end_step` times each step for the cost model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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
from fxllm.runtime.speculative.policy import SequencePolicy, StepCostModel
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
    requests_disabled: int = 0  # requests that backed off (stopped drafting a while) at least once
    backoffs: int = 0  # backoffs of sequences for low acceptance (a sequence may back off repeatedly)
    steps_speculated: int = 0  # steps that proposed drafts
    steps_skipped_cost: int = 0  # steps the cost model kept plain (verification would not pay)
    steps_explored: int = 0  # steps run against (or before) the cost model's verdict to re-measure a kind

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
        self.clock: Callable[[], float] = time.perf_counter  # step times for the cost model (tests fake it)
        # A drafter with per-sequence state (EAGLE-3's head KV, kept up by before_step) cannot resume after a
        # backoff without catching up every skipped position: there a backoff is for the rest of the request.
        self._stateful = hasattr(proposer, "before_step")
        self._reset_policy()

    def _reset_policy(self) -> None:
        on = self.config.auto_disable == "on"
        self.cost = StepCostModel(self.config.auto_margin, self.config.auto_explore_interval) if on else None
        self._seqs: dict[int, SequencePolicy] = {}
        self._backed_off: set[str] = set()  # request ids counted in stats.requests_disabled
        self._stopped: set[str] = set()  # request ids that never draft again (stateful drafters)
        self._step_start: float | None = None
        self._decoding: set[int] = set()  # seq ids that decoded in this step (the step is timed if all did)

    def reset_stats(self) -> None:
        """Forget the counters and the policy's estimates (after the engine's warm-up: compile times)."""
        self.stats = SpecStats()
        self._reset_policy()

    # ---- before scheduling --------------------------------------------------------------------
    def propose(self, engine: Engine) -> None:
        """Set draft_token_ids on every eligible decoding sequence (and clear everyone else's)."""
        self._step_start = self.clock()
        before_step = getattr(self.proposer, "before_step", None)
        if before_step is not None:  # EAGLE-3: the head reads the previous step's hidden states first
            before_step(engine)
        decoding = [s for s in engine.scheduler.running if s.num_uncomputed_tokens == 1]
        self._decoding = {s.seq_id for s in decoding}
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
        if not seqs or not self._worth_it(len(decoding), seqs):
            return
        proposed = False
        for seq, drafts in zip(seqs, self.proposer.propose(seqs, limits)):
            seq.draft_token_ids = list(drafts)
            proposed = proposed or bool(drafts)
        self.stats.steps_speculated += proposed

    def _worth_it(self, batch: int, seqs: list[Sequence]) -> bool:
        """The cost model's verdict for this step (always yes with speculative.auto_disable=off)."""
        if self.cost is None:
            return True
        # A sequence that never verified counts as accepting all k: each gets tried once (its prompt may
        # suit the drafter where the previous ones did not) unless even that would not pay.
        prior = float(self.config.num_speculative_tokens)
        accepted = 0.0
        for seq in seqs:
            policy = self._seqs.get(seq.seq_id)
            ema = policy.accepted_ema if policy is not None else None
            accepted += prior if ema is None else ema
        decision = self.cost.decide(batch, batch + accepted)
        if decision.reason != "cost":
            self.stats.steps_explored += 1
        elif not decision.speculate:
            self.stats.steps_skipped_cost += 1
        return decision.speculate

    def end_step(self, scheduled: list[ScheduledSequence]) -> None:
        """After the engine's step: its wall time goes to the cost model if it ran decodes only."""
        start, self._step_start = self._step_start, None
        if self.cost is None or start is None or not scheduled:
            return
        if any(item.seq.seq_id not in self._decoding for item in scheduled):
            return  # a prefill chunk rode along: the time says nothing about either step kind
        verified = any(item.num_new_tokens > 1 for item in scheduled)
        self.cost.record(len(scheduled), verified, self.clock() - start)

    def _eligible(self, request: Request, seq: Sequence) -> bool:
        """Requests whose sampling reads the history per token (penalties, min_tokens) or asks logprobs
        are decoded plainly; so are sequences backed off for low acceptance."""
        params = request.params
        if params.has_penalties or params.logprobs is not None or seq.num_output_tokens < params.min_tokens:
            return False
        if request.request_id in self._stopped:
            return False
        policy = self._seqs.get(seq.seq_id)
        return policy is None or not policy.backed_off(seq.num_output_tokens)

    def stopped(self, request: Request) -> bool:
        """Whether `request` will never speculate again (penalties, logprobs, or a stateful drafter's
        backoff): a drafter with per-sequence state (EAGLE-3's head KV) may stop maintaining it."""
        params = request.params
        return params.has_penalties or params.logprobs is not None or request.request_id in self._stopped

    def _observe(self, engine: Engine, request: Request, seq: Sequence, drafted: int, accepted: int) -> None:
        """Fold one verify step into the sequence's acceptance; back it off when a window closes low."""
        if len(self._seqs) > 2 * len(engine._by_seq) + 64:  # forget finished sequences now and then
            self._seqs = {i: p for i, p in self._seqs.items() if i in engine._by_seq}
            self._backed_off &= engine.requests.keys()
            self._stopped &= engine.requests.keys()
        policy = self._seqs.setdefault(seq.seq_id, SequencePolicy())
        config, stats = self.config, self.stats
        if not policy.observe(drafted, accepted, config.min_acceptance_rate, config.min_acceptance_window):
            return
        stats.backoffs += 1
        if request.request_id not in self._backed_off:
            self._backed_off.add(request.request_id)
            stats.requests_disabled += 1
        if self._stateful:
            self._stopped.add(request.request_id)
            policy.num_backoffs += 1
            length = "the rest of the request"
        else:
            length = f"{policy.back_off(seq.num_output_tokens, config.backoff_tokens, config.backoff_max_tokens)} tokens"
        # Powers of two: under load many sequences back off; the log grows with the logarithm of the count.
        level = logging.INFO if stats.backoffs & (stats.backoffs - 1) == 0 else logging.DEBUG
        logger.log(
            level, "request %s (sequence %d) drafts nothing for %s: acceptance below speculative.min_acceptance_rate"
            "=%.2f over its last %d+ drafted tokens (backoff %d of this sequence); %d backoffs of %d requests so far",
            request.request_id, seq.seq_id, length, config.min_acceptance_rate, config.min_acceptance_window,
            policy.num_backoffs, stats.backoffs, stats.requests_disabled,
        )  # fmt: skip

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
        metrics.spec_verify_steps += 1
        metrics.spec_draft_tokens += run.num_drafts
        metrics.spec_accepted_tokens += accepted
        stats.verify_steps += 1
        stats.draft_tokens += run.num_drafts
        stats.accepted_tokens += accepted
        seq = state.seq
        self._observe(engine, request, seq, run.num_drafts, accepted)
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
        "speculative decoding: method %s, %d tokens per step, off above %d decoding sequences, per step when "
        "verification does not pay (auto_disable=%s, margin %.2f), per sequence below %.2f acceptance",
        config.method, config.num_speculative_tokens, config.disable_batch_size, config.auto_disable,
        config.auto_margin, config.min_acceptance_rate,
    )  # fmt: skip
    # The decode CUDA graphs (captured after this, on a GPU) get verify buckets for every 1 + d, d <= k, up
    # to the batch size that still speculates.
    engine.runner.verify_query_lens = verify_query_lens(config.num_speculative_tokens)
    engine.runner.verify_max_batch = config.disable_batch_size
    speculator = SpeculativeDecoder(config, proposer)
    speculator.async_was_on = async_was_on  # a plain baseline in the same process turns it back on
    engine.speculator = speculator
    return speculator
