"""The step's flat layout from a mixed schedule, checked by hand: plain decodes (the fast path, one with its
token still in flight), a prefill chunk with prompt logprobs, and a decode that verifies two drafts."""

from __future__ import annotations

import torch

from fxllm.runtime.scheduler import ScheduledSequence
from fxllm.runtime.sequence import Sequence
from fxllm.runtime.step_inputs import block_table_array, build_step_inputs


def _seq(seq_id: int, tokens: list[int], prompt: int, computed: int, table: list[int]) -> Sequence:
    seq = Sequence(seq_id, tokens, prompt, max_tokens=16, arrival_time=0.0)
    seq.num_computed_tokens, seq.block_table = computed, table
    return seq


def test_mixed_schedule_layout() -> None:
    a = _seq(1, [10, 11, 12, 13, 14, 15, 16], 5, 6, [3, 9])  # decode at position 6, token in flight
    b = _seq(2, list(range(20, 30)), 10, 4, [1, 2, 5])  # prompt chunk 4..7 of 10, with prompt logprobs
    c = _seq(3, [40, 41, 42, 43, 44, 45], 4, 5, [7, 8])  # decode at 5 + drafts 11, 12
    c.draft_token_ids = [11, 12]
    d = _seq(4, [50, 51, 52], 2, 2, [4])  # plain decode at position 2
    scheduled = [
        ScheduledSequence(a, 1),
        ScheduledSequence(b, 4),
        ScheduledSequence(c, 3),
        ScheduledSequence(d, 1),
    ]
    pending_ids = torch.tensor([70, 99])
    got = build_step_inputs(scheduled, 4, torch.device("cpu"), {1: 1}, pending_ids, prompt_logits={2})
    assert got.input_ids.tolist() == [[99, 24, 25, 26, 27, 45, 11, 12, 52]]  # a's token from pending row 1
    assert got.position_ids.tolist() == [[6, 4, 5, 6, 7, 5, 6, 7, 2]]
    # slot = table[position // 4] * 4 + position % 4
    assert got.slot_mapping.tolist() == [38, 8, 9, 10, 11, 33, 34, 35, 18]
    assert got.block_tables.tolist() == [[3, 9, 0], [1, 2, 5], [7, 8, 0], [4, 0, 0]]
    assert got.block_tables.dtype == torch.int32 and got.seq_lens.dtype == torch.int32
    assert got.seq_lens.tolist() == [7, 8, 8, 3]
    assert got.query_start_loc.tolist() == [0, 1, 5, 8, 9]
    # Sampled rows (a, c's known token and two drafts, d), then b's prompt positions 4..7 (flat 1..4).
    assert got.logits_indices.tolist() == [0, 5, 6, 7, 8, 1, 2, 3, 4]
    assert got.sampled == [0, 2, 3] and got.draft_counts == [0, 2, 0]
    assert got.prompt_rows == [(1, 4, 4)]
    assert got.chunks == [(1, 0, 6, 1), (2, 1, 4, 4), (3, 5, 5, 3), (4, 8, 2, 1)]


def test_block_table_array_pads_with_zeros() -> None:
    assert block_table_array([[5], [1, 2, 3], []]).tolist() == [[5, 0, 0], [1, 2, 3], [0, 0, 0]]
    assert block_table_array([]).shape == (0, 0)
