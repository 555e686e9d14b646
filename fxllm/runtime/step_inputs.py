"""The step's model inputs: a flat token batch plus attention metadata, built from the schedule."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from fxllm.runtime.scheduler import ScheduledSequence


@dataclass
class StepInputs:
    """Everything one forward needs, passed explicitly (no module-global step context)."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    slot_mapping: torch.Tensor  # [T] int64 (the op skips slots < 0)
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32: context length after this step
    query_start_loc: torch.Tensor  # [S + 1] int32
    logits_indices: torch.Tensor  # [N] int64: flat positions whose logits are sampled
    sampled: list[int]  # indices into the scheduled list of the N sequences that sample
    # Prompt logprobs: (scheduled index, first position, count) per sequence that asked; their logits rows
    # follow the N sampled rows, in this order (positions first..first+count-1, each predicting the next).
    prompt_rows: list[tuple[int, int, int]] = field(default_factory=list)
    # Speculative decoding: per sampled sequence, how many drafted tokens follow its last known token in
    # this step; such a sequence has 1 + drafts consecutive logits rows (verification), others one.
    draft_counts: list[int] = field(default_factory=list)
    # Per scheduled sequence (seq_id, first flat row, first position, tokens): where its chunk sits, so that
    # per-token outputs other than logits (EAGLE-3's hidden states) can be read back per sequence.
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def num_sample_rows(self) -> int:
        """Logits rows of the sampled sequences (before any prompt-logprob rows)."""
        return len(self.sampled) + sum(self.draft_counts)

    def named_args(self) -> dict[str, torch.Tensor]:
        """Step inputs by their role in the runtime signature (the runner orders them; KV caches are its own)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "slot_mapping": self.slot_mapping,
            "block_tables": self.block_tables,
            "seq_lens": self.seq_lens,
            "query_start_loc": self.query_start_loc,
            "logits_indices": self.logits_indices,
        }


# Stands for a token sampled by the step still in flight (async scheduling): the host does not know
# it yet, so the input id is filled on the device from that step's sampled ids (`fill_pending_tokens`).
PENDING_TOKEN = -1


def block_table_array(tables: list[list[int]]) -> np.ndarray:
    """[S, longest] int32 block tables, zero-padded: one vectorised fill (a nested list through
    torch.tensor took 2 ms for 759 tables of <= 12 blocks, this 0.7 ms)."""
    lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    out = np.zeros((len(tables), int(lengths.max(initial=0))), dtype=np.int32)
    out[np.arange(out.shape[1]) < lengths[:, None]] = np.fromiter(
        chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum())
    )
    return out


def _on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: through pinned memory, without waiting, on CUDA."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def build_step_inputs(
    scheduled: list[ScheduledSequence],
    block_size: int,
    device: torch.device,
    pending_rows: dict[int, int] | None = None,
    pending_ids: torch.Tensor | None = None,
    prompt_logits: Container[int] = (),
) -> StepInputs:
    """Lay out the scheduled chunks of every sequence in one token dimension.

    `pending_rows` maps the seq_id of a sequence whose last token is PENDING_TOKEN to its row in
    `pending_ids` (the previous step's sampled ids, on the device); those inputs are copied there on
    the device, so the forward never waits for the host to learn the token. Sequences whose seq_id is in
    `prompt_logits` also get logits for every prompt position of their chunk whose next token is a prompt
    token (rows after the sampled ones, `prompt_rows`).
    """
    tokens: list[int] = []
    fill_at: list[int] = []  # flat positions of pending tokens
    fill_from: list[int] = []  # their rows in pending_ids
    positions: list[int] = []
    slots: list[int] = []
    seq_lens: list[int] = []
    starts: list[int] = [0]
    logits_indices: list[int] = []
    sampled: list[int] = []
    draft_counts: list[int] = []
    prompt_rows: list[tuple[int, int, int]] = []
    prompt_indices: list[int] = []
    chunks: list[tuple[int, int, int, int]] = []
    tables: list[list[int]] = []
    pending = pending_rows or {}
    for index, item in enumerate(scheduled):
        seq, begin, count = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
        end, token_ids, table = begin + count, seq.token_ids, seq.block_table
        flat = len(tokens)
        chunks.append((seq.seq_id, flat, begin, count))
        tables.append(table)
        seq_lens.append(end)
        if count == 1 and end == len(token_ids):
            # A plain decode (most rows of a large batch): one token, sampled, never a prompt-logits row
            # (its position is past the prompt's last one but one). The general path below gives the same.
            tokens.append(token_ids[begin])
            positions.append(begin)
            slots.append(table[begin // block_size] * block_size + begin % block_size)
            if seq.seq_id in pending:
                fill_at.append(flat)
                fill_from.append(pending[seq.seq_id])
                tokens[flat] = 0  # a valid id until the device copy below lands
            starts.append(flat + 1)
            logits_indices.append(flat)
            sampled.append(index)
            draft_counts.append(0)
            continue
        tokens += token_ids[begin:end]
        # A decode scheduled past its last known token verifies that many drafts (speculative decoding).
        num_drafts = max(0, end - len(token_ids))
        if end == len(token_ids) and seq.seq_id in pending:
            fill_at.append(len(tokens) - 1)
            fill_from.append(pending[seq.seq_id])
            tokens[-1] = 0  # as above
        if num_drafts:
            tokens += seq.draft_token_ids[:num_drafts]
        positions += range(begin, end)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(begin, end)]
        starts.append(len(tokens))
        if end >= len(token_ids):  # the chunk reaches the last known token: its logits are sampled
            logits_indices += range(len(tokens) - 1 - num_drafts, len(tokens))
            sampled.append(index)
            draft_counts.append(num_drafts)
        last = min(end, seq.num_prompt_tokens - 1)  # the last prompt position has no prompt token after it
        if seq.seq_id in prompt_logits and begin < last:
            prompt_rows.append((index, begin, last - begin))
            chunk_start = len(tokens) - (end - begin)
            prompt_indices += range(chunk_start, chunk_start + last - begin)

    def as_tensor(data: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        return _on_device(torch.tensor(data, dtype=dtype), device)

    # [1, T] tensors of their own, not views of [T] ones: Dynamo guards a view input on its base's
    # sizes, so views here (and none in the decode graphs' static buffers) recompiled the graph for
    # the first decode bucket and again for bucket 1 (CUDA-graph capture 14 s on the H100).
    input_ids = as_tensor([tokens], torch.long)
    if fill_at:
        if pending_ids is None:
            raise ValueError("pending_rows were given without the previous step's sampled ids")
        rows = as_tensor(fill_from, torch.long)
        input_ids[0].index_copy_(0, as_tensor(fill_at, torch.long), pending_ids.index_select(0, rows).long())
    return StepInputs(
        input_ids=input_ids,
        position_ids=as_tensor([positions], torch.long),
        slot_mapping=as_tensor(slots, torch.long),
        block_tables=_on_device(torch.from_numpy(block_table_array(tables)), device),
        seq_lens=as_tensor(seq_lens, torch.int32),
        query_start_loc=as_tensor(starts, torch.int32),
        logits_indices=as_tensor(logits_indices + prompt_indices, torch.long),
        sampled=sampled,
        prompt_rows=prompt_rows,
        draft_counts=draft_counts,
        chunks=chunks,
    )
