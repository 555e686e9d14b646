"""EAGLE-3 drafting: a one-layer head reads the target's hidden states and drafts k tokens per step.

The target graph returns the residual stream entering three of its layers (pass expose_hidden_states);
the runner keeps the last step's rows (`ModelRunner.last_hidden`). Each engine step, before scheduling:

1. Catch-up (`before_step`): for every sequence of the previous step, the positions p whose hidden state
   is now valid (p < num_computed_tokens: accepted tokens only) and whose next token t_{p+1} is known run
   through the head as rows (t_{p+1}, h_p, position p). This writes the head's K/V for those positions and,
   for a sequence whose last row is its last known token, gives the first draft and the head's hidden state.
2. Drafting (`propose`): k - 1 more head steps, one row per sequence (the previous draft, the head's own
   hidden), greedy; drafts are point masses for the rejection sampler.

The head's KV cache is a pool of its own with the target's geometry in blocks: block b of the head's pool
belongs to whoever owns the target's block b, and an entry for position p sits at the target's slot of p.
So it follows the target's block tables, frees, preemption (recomputed prompts run through the catch-up
again) and rollback (rejected positions are never caught up; their slots are overwritten later) with no
bookkeeping of its own. Draft steps write their speculative entries past the known tokens: into the
sequence's own last block where it has room, else into scratch blocks past the target's block ids.

Prefix caching: a reused block's head entries are reused too (marked, not recomputed). The entry at p
depends on the tokens up to p + 1, so every entry but the block's last one is what a recompute would give;
the last one came from the next token the writing sequence had. A different next token changes only the
drafts (acceptance), never the output: verification decides every token.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fxllm.passes.expose_hidden_states import OPTION, default_layer_ids
from fxllm.passes.pipeline import PassConfig
from fxllm.runtime.sequence import Sequence
from fxllm.runtime.speculative.eagle3_head import Eagle3Head, read_head_config, read_head_weights

if TYPE_CHECKING:
    from fxllm.config import FxllmConfig
    from fxllm.runtime.engine import Engine
    from fxllm.runtime.model_runner import ModelRunner

logger = logging.getLogger(__name__)

PASS_NAME = "expose_hidden_states"


def hidden_layer_ids(config: FxllmConfig, target_config: Any) -> list[int]:
    """The target layers the head reads: its config's `eagle_aux_hidden_state_layer_ids`, else the default."""
    head = read_head_config(str(config.speculative.model))
    num_layers = int(target_config.num_hidden_layers)
    ids = head.aux_layer_ids or default_layer_ids(num_layers)
    if len(ids) != 3 or not all(0 <= i < num_layers for i in ids):
        raise ValueError(f"EAGLE-3 head layer ids {ids} must be three layers of the target's {num_layers}")
    return list(ids)


def with_hidden_state_outputs(config: FxllmConfig, target_config: Any) -> FxllmConfig:
    """A copy of `config` whose pass expose_hidden_states returns the head's layers (speculative.method=eagle3);
    the compile cache keys on it, so graphs with and without the outputs stay apart."""
    if config.speculative.method != "eagle3":
        return config
    if config.parallel.tensor_parallel_size > 1:
        raise ValueError("speculative.method=eagle3 runs with parallel.tensor_parallel_size=1 only")
    out = copy.deepcopy(config)
    current = out.compile.passes.get(PASS_NAME, PassConfig())
    options = {**current.options, OPTION: hidden_layer_ids(config, target_config)}
    out.compile.passes[PASS_NAME] = PassConfig(current.enabled, current.skip_on_error, options)
    return out


def attention_for(runner: ModelRunner) -> Any:
    """The paged-attention implementation the target's graph got (a backend's op, or the reference op).

    On CUDA the target's attention is usually fused with its RoPE (pass fuse_rope_attention: the graph holds
    paged_attention_rope only); the head applies its RoPE itself and calls plain paged_attention, so it takes
    the same backend's paged_attention (the Triton backend registers both). Without this it got the reference
    op on the GPU: correct, but a PyTorch loop per sequence in every head step."""
    from fxllm.backends.registry import REFERENCE, implementation
    from fxllm.passes.lower_ops import implementations_chosen

    chosen = implementations_chosen(runner.graph_module)
    for op in ("paged_attention", "paged_attention_rope"):
        backend = chosen.get(op, REFERENCE)
        if backend == REFERENCE or "," in backend:
            continue
        try:
            target = implementation("paged_attention", backend).target()
        except KeyError:  # a backend with the fused op only
            continue
        if target is not None:
            return target
    if runner.device.type == "cuda":
        logger.warning(
            "speculative eagle3: the head's attention runs the reference paged_attention (the target's graph "
            "chose %s): slow", {k: v for k, v in chosen.items() if "attention" in k},
        )  # fmt: skip
    return torch.ops.fxllm.paged_attention.default


@dataclass
class HeadState:
    """A sequence's head output at its last known token: where, the head's hidden there, the first draft."""

    position: int
    hidden: Tensor  # [H]
    draft: int


class Eagle3Proposer:
    """Catches the head up on each step's accepted tokens and drafts k tokens per sequence."""

    def __init__(self, head: Eagle3Head, runner: ModelRunner, max_seqs: int, max_drafts: int) -> None:
        self.head = head
        self.runner = runner
        self.device = runner.device
        self.block_size = runner.block_size
        self.num_blocks = runner.num_blocks
        # Draft positions past a sequence's allocated blocks go to scratch blocks after the target's ids.
        self.scratch_per_seq = -(-max_drafts // self.block_size) + 1
        self.num_scratch = max_seqs * self.scratch_per_seq
        c = head.config
        shape = (self.num_blocks + self.num_scratch, self.block_size, c.num_key_value_heads, c.head_dim)
        dtype = runner.dtype
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.attention = attention_for(runner)
        self.states: dict[int, HeadState] = {}
        self.num_caught_up = 0  # rows run through the head by catch-ups
        self.num_draft_steps = 0  # head forwards while drafting (one row per sequence)

    # ---- helpers --------------------------------------------------------------------------------
    def _tensor(self, data: list[int] | list[list[int]], dtype: torch.dtype) -> Tensor:
        tensor = torch.tensor(data, dtype=dtype)
        return (
            tensor.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else tensor
        )

    def _run(
        self, tokens: list[int], hidden: Tensor, positions: list[int], slots: list[int], tables: list[list[int]],
        seq_lens: list[int], starts: list[int],
    ) -> Tensor:  # fmt: skip
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return self.head(
            self._tensor(tokens, torch.long), hidden, self._tensor(positions, torch.long), self.attention,
            self.k_cache, self.v_cache, self._tensor(slots, torch.long), self._tensor(padded, torch.int32),
            self._tensor(seq_lens, torch.int32), self._tensor(starts, torch.int32),
        )  # fmt: skip

    # ---- before scheduling: the previous step's accepted tokens ----------------------------------
    def before_step(self, engine: Engine) -> None:
        """Run the previous step's valid rows through the head (its K/V, and each sequence's first draft)."""
        running = {seq.seq_id: seq for seq in engine.scheduler.running}
        self.states = {k: v for k, v in self.states.items() if k in running}
        stash, self.runner.last_hidden = self.runner.last_hidden, None
        if stash is None:
            return
        inputs, hidden = stash
        width = 3 * self.head.config.target_hidden_size
        if hidden.shape[-1] != width:
            raise ValueError(
                f"the EAGLE-3 head reads 3 x {self.head.config.target_hidden_size} hidden states; the target returns "
                f"{hidden.shape[-1]} per token (speculative.model is a head for another target)"
            )
        bs = self.block_size
        rows: list[int] = []
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        seq_lens: list[int] = []
        starts = [0]
        # (seq_id, row) of the sequences whose last row is their last known token: they get a first draft
        ends: list[tuple[int, int]] = []
        speculator = engine.speculator
        for seq_id, start, first, count in inputs.chunks:
            seq = running.get(seq_id)
            entry = engine._by_seq.get(seq_id)
            if seq is None or entry is None:
                continue
            if speculator is not None and speculator.stopped(entry[0]):
                self.states.pop(seq_id, None)  # never drafts again: its head KV is not kept up
                continue
            last = min(first + count, seq.num_computed_tokens, seq.num_tokens - 1)  # exclusive
            if last <= first:
                continue
            table = seq.block_table
            rows += range(start, start + last - first)
            tokens += seq.token_ids[first + 1 : last + 1]
            positions += range(first, last)
            slots += [table[p // bs] * bs + p % bs for p in range(first, last)]
            tables.append(table)
            seq_lens.append(last)
            starts.append(len(rows))
            if last == seq.num_tokens - 1:
                ends.append((seq_id, len(rows) - 1))
        if not rows:
            return
        picked = hidden.index_select(0, self._tensor(rows, torch.long))
        prenorm = self._run(tokens, picked, positions, slots, tables, seq_lens, starts)
        self.num_caught_up += len(rows)
        if ends:
            at = self._tensor([row for _, row in ends], torch.long)
            last_hidden = prenorm.index_select(0, at)
            drafts = self.head.draft_tokens(last_hidden).tolist()
            for i, (seq_id, row) in enumerate(ends):
                self.states[seq_id] = HeadState(positions[row], last_hidden[i], int(drafts[i]))

    # ---- drafting -----------------------------------------------------------------------------------
    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Up to limits[i] greedy drafts per sequence (none for a sequence the head has not caught up on)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        active: list[int] = []
        hiddens: list[Tensor] = []
        for i, seq in enumerate(seqs):
            state = self.states.get(seq.seq_id)
            if state is None or state.position != seq.num_tokens - 2 or limits[i] < 1:
                continue
            drafts[i].append(state.draft)
            active.append(i)
            hiddens.append(state.hidden)
        bs = self.block_size
        step = 1
        while active:
            active_now = [(i, h) for i, h in zip(active, hiddens) if limits[i] > step]
            if not active_now:
                break
            tokens, positions, slots, tables, seq_lens = [], [], [], [], []
            for i, _ in active_now:
                seq = seqs[i]
                position = seq.num_tokens - 2 + step  # the previous draft's position
                scratch = self.num_blocks + i * self.scratch_per_seq  # the same blocks at every step
                table = list(seq.block_table)
                needed = position // bs + 1
                table += [scratch + j for j in range(max(0, needed - len(table)))]
                tokens.append(drafts[i][-1])
                positions.append(position)
                slots.append(table[position // bs] * bs + position % bs)
                tables.append(table)
                seq_lens.append(position + 1)
            hidden = torch.stack([h for _, h in active_now])
            prenorm = self._run(
                tokens, hidden, positions, slots, tables, seq_lens, list(range(len(tokens) + 1))
            )
            self.num_draft_steps += 1
            new = self.head.draft_tokens(prenorm).tolist()
            for row, (i, _) in enumerate(active_now):
                drafts[i].append(int(new[row]))
            active = [i for i, _ in active_now]
            hiddens = list(prenorm.unbind(0))
            step += 1
        return drafts


def build_eagle3_drafter(config: FxllmConfig, engine: Engine, embedding: Tensor | None) -> Eagle3Proposer:
    """The EAGLE-3 proposer for `engine`, whose graph returns the head's hidden states."""
    spec = config.speculative
    runner = engine.runner
    if not getattr(runner, "returns_hidden", False):
        raise ValueError(
            "speculative.method=eagle3: the target graph returns no hidden states (pass expose_hidden_states "
            "is disabled or found no layers)"
        )
    if embedding is None:
        raise ValueError("speculative.method=eagle3 needs the target's input embedding (drafter_source)")
    folder = str(spec.model)
    head_config = read_head_config(folder)
    if head_config.vocab_size > engine.vocab_size:
        raise ValueError(
            f"speculative.model={folder}: the head's vocabulary has {head_config.vocab_size} ids, the target "
            f"{engine.vocab_size}; use a head trained for this target"
        )
    head = Eagle3Head(head_config, read_head_weights(folder), embedding).to_device(
        runner.device, runner.dtype
    )
    proposer = Eagle3Proposer(head, runner, engine.scheduler.config.max_num_seqs, spec.num_speculative_tokens)
    logger.info(
        "speculative eagle3: head %s (hidden %d, draft vocabulary %d), KV pool %d + %d scratch blocks",
        folder, head_config.hidden_size, head_config.draft_vocab_size, proposer.num_blocks, proposer.num_scratch,
    )  # fmt: skip
    return proposer
