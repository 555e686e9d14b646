"""Decode buckets: steps padded to a bucket give the same greedy tokens as HF generate.

The CUDA graph itself is captured only on a GPU (benchmarks/gpu.py checks that); here the identical
padded path runs without capture, which is what can go wrong on the host side: the padding rows
(slot -1, length 1), stale block-table columns from earlier larger steps, and the bucket choice.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.passes.runtime_signature import RuntimeSignature
from fxllm.runtime.builder import decode_bucket_sizes
from fxllm.runtime.cuda_graphs import DecodeGraphs
from fxllm.runtime.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def add(a, b):",
    "List three colours:",
    "Once upon a time, in a small village by the sea, there lived",
    "Q: What is 12 times 12?\nA:",
    "The quick brown fox",
]
MAX_NEW = 20


@pytest.fixture(scope="module")
def hf(smollm2_short):
    """SmolLM2's first 4 layers (conftest.py, shared; engines build on deepcopies): the padding and bucket
    logic does not depend on depth, capture and passes take a seventh of the time."""
    return smollm2_short


@pytest.fixture(scope="module")
def prompts(hf) -> list[list[int]]:
    return [hf.tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(hf, prompts) -> list[list[int]]:
    with torch.no_grad():
        return [
            hf.model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]


def _padded_llm(hf, sizes: list[int]) -> LLM:
    config = load_config(None, ["compile.backend=eager", "model.max_model_len=256"])
    llm = LLM(copy.deepcopy(hf.model), config=config, tokenizer=hf.tokenizer)
    llm.engine.runner.enable_decode_graphs(sizes, llm.engine.max_model_len, capture=False)
    return llm


def test_padded_decode_matches_hf(hf, prompts, expected) -> None:
    llm = _padded_llm(hf, [1, 2, 4, 8])
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None
    # Different lengths: the batch shrinks 6 -> 1 as requests finish, so steps pad into buckets 8,
    # 4, 2 and 1 and later steps see block-table columns that earlier, longer rows wrote.
    lengths = [MAX_NEW, 3, 9, 14, 6, 1]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in lengths]
    outs = llm.generate(prompts, params)
    for i, (out, ref, n) in enumerate(zip(outs, expected, lengths)):
        assert out.outputs[0].token_ids == ref[:n], f"prompt {i} differs with padded decode"
    assert graphs.num_replays >= MAX_NEW - 1  # every decode step went through a bucket
    assert graphs.num_too_large == 0


def test_step_larger_than_every_bucket_runs_unpadded_and_is_counted(hf, prompts, expected) -> None:
    llm = _padded_llm(hf, [1, 2])
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None
    outs = llm.generate(prompts[:4], SamplingParams(max_tokens=8, temperature=0))
    assert [o.outputs[0].token_ids for o in outs] == [ref[:8] for ref in expected[:4]]
    assert graphs.num_too_large > 0


def test_bucket_sizes_are_capped_at_the_batch_limit() -> None:
    assert decode_bucket_sizes([1, 2, 4, 8, 16, 256], 12) == [1, 2, 4, 8, 12]
    assert decode_bucket_sizes([64, 1], 64) == [1, 64]
    with pytest.raises(ValueError, match="positive integers"):
        decode_bucket_sizes([0, 4], 64)


def test_capture_needs_a_gpu() -> None:
    with pytest.raises(ValueError, match=r"compile\.cuda_graphs=false"):
        DecodeGraphs(lambda *a: None, RuntimeSignature(), {}, [1], 4, torch.device("cpu"), capture=True)


def test_model_inputs_are_not_views_in_steps_or_buckets() -> None:
    # Dynamo guards a view input on its base's sizes: if steps passed views and the decode buckets'
    # static buffers did not (or the other way round), capturing the buckets recompiled the graph.
    from fxllm.runtime.cuda_graphs import _static_inputs
    from fxllm.runtime.scheduler import ScheduledSequence
    from fxllm.runtime.sequence import Sequence
    from fxllm.runtime.step_inputs import build_step_inputs

    seqs = [Sequence(seq_id=i, token_ids=list(range(5 + i)), num_prompt_tokens=5 + i, max_tokens=4,
                     arrival_time=0.0) for i in range(2)]  # fmt: skip
    for i, seq in enumerate(seqs):
        seq.block_table = [i]
    step = build_step_inputs([ScheduledSequence(s, s.num_tokens) for s in seqs], 16, torch.device("cpu"))
    assert step.input_ids.shape == step.position_ids.shape == (1, 11)
    for name, tensor in step.named_args().items():
        assert tensor._base is None, f"step input {name} is a view"
    for name, tensor in _static_inputs(4, 8, torch.device("cpu")).items():
        assert tensor._base is None, f"decode bucket input {name} is a view"


# ---- verify buckets (speculative decoding) ----------------------------------------------------------
SPEC_PROMPTS = [
    "Copy this list twice: apple, pear, plum, fig. apple, pear, plum, fig. apple, pear,",
    "def square(x):\n    return x * x\n\ndef square(x):\n    return x * x\n\ndef",
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the",
    "one two three four five one two three four five one two",
]


def _spec_llm(hf, sizes: list[int] | None, k: int = 4) -> LLM:
    overrides = ["compile.backend=eager", "model.max_model_len=256", "speculative.method=ngram",
                 f"speculative.num_speculative_tokens={k}", "speculative.min_acceptance_rate=0", "speculative.auto_disable=off"]  # fmt: skip
    llm = LLM(copy.deepcopy(hf.model), config=load_config(None, overrides), tokenizer=hf.tokenizer)
    if sizes is not None:  # what the builder does on a GPU, without capture
        llm.engine.runner.enable_decode_graphs(sizes, llm.engine.max_model_len, capture=False)
    return llm


@pytest.fixture(scope="module")
def spec_expected(hf) -> list[list[int]]:
    """Plain greedy decoding of the speculative prompts through the engine (HF's generate gives the same;
    the engine is the reference here because speculation must reproduce it token for token)."""
    llm = LLM(copy.deepcopy(hf.model), config=load_config(None, ["compile.backend=eager", "model.max_model_len=256"]),
              tokenizer=hf.tokenizer)  # fmt: skip
    outs = llm.generate(SPEC_PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def test_verify_buckets_are_set_up_from_the_speculative_config(hf) -> None:
    llm = _spec_llm(hf, [1, 2, 4, 64], k=3)
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None
    # 1 + d for d = 1..3, for the batch sizes up to speculative.disable_batch_size (32)
    assert sorted((b.size, b.query_len) for b in graphs.verify_buckets) == [
        (s, q) for s in (1, 2, 4) for q in (2, 3, 4)
    ]
    bucket = graphs._verify_bucket(3, 3, 1)
    assert bucket is not None and (bucket.size, bucket.query_len) == (4, 3)
    assert graphs._verify_bucket(5, 2, 1) is None and graphs.num_verify_unmatched == 1


@pytest.mark.parametrize("batch", [1, 4])
def test_speculative_greedy_through_verify_buckets_equals_plain(hf, spec_expected, batch: int) -> None:
    # Batch 1: every verify step is uniform (1 + d tokens, a bucket of exactly that length). Batch 4: the
    # sequences' draft counts differ, so rows are padded inside the bucket (and the bucket has padding rows
    # once sequences finish, given different max_tokens).
    llm = _spec_llm(hf, [1, 2, 4, 8])
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None
    lengths = [MAX_NEW, 7, 13, MAX_NEW]
    got = []
    for start in range(0, len(SPEC_PROMPTS), batch):
        params = [
            SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            for n in lengths[start : start + batch]
        ]
        got += [o.outputs[0].token_ids for o in llm.generate(SPEC_PROMPTS[start : start + batch], params)]
    for i, (out, ref, n) in enumerate(zip(got, spec_expected, lengths)):
        assert out == ref[:n], f"prompt {i} differs with speculation through verify buckets"
    stats = llm.engine.speculator.stats  # type: ignore[union-attr]
    assert stats.accepted_tokens > 0, "nothing accepted: the verify path was not exercised"
    assert graphs.num_verify_replays > 0
    assert graphs.num_verify_unmatched == 0
    if batch > 1:
        assert graphs.num_verify_padded > 0, "no step had unequal draft counts: the padding went untested"


def test_verify_layout_pads_each_row_after_its_real_tokens() -> None:
    """Host-side layout: two sequences with 3 and 1 drafts -> the Q = 4 bucket of size 2 (fake forward)."""
    from fxllm.passes.runtime_signature import GraphInput
    from fxllm.runtime.step_inputs import StepInputs

    seen: dict[str, torch.Tensor] = {}

    def forward(*args: torch.Tensor) -> tuple[torch.Tensor]:
        seen.update(zip(names, (a.clone() for a in args)))
        ids = args[0][0]
        return (torch.stack([ids.float(), torch.zeros_like(ids, dtype=torch.float)], dim=1),)  # [T, 2] logits

    names = ["input_ids", "position_ids", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
             "logits_indices"]  # fmt: skip
    signature = RuntimeSignature(inputs=[GraphInput(n, n, torch.long) for n in names])  # type: ignore[arg-type]
    graphs = DecodeGraphs(forward, signature, {}, [2, 4], 4, torch.device("cpu"), capture=False,
                          query_lens=[4])  # fmt: skip
    # seq A: 1 known + 3 drafts at positions 10..13; seq B: 1 known + 1 draft at positions 5..6
    step = StepInputs(
        input_ids=torch.tensor([[11, 12, 13, 14, 21, 22]]),
        position_ids=torch.tensor([[10, 11, 12, 13, 5, 6]]),
        slot_mapping=torch.tensor([110, 111, 112, 113, 205, 206]),
        block_tables=torch.tensor([[7, 8], [9, 0]], dtype=torch.int32),
        seq_lens=torch.tensor([14, 7], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 4, 6], dtype=torch.int32),
        logits_indices=torch.arange(6),
        sampled=[0, 1],
        draft_counts=[3, 1],
    )
    assert graphs.accepts(step)
    logits = graphs.run(step)
    assert logits[:, 0].tolist() == [11, 12, 13, 14, 21, 22]  # the real rows, in the step's order
    assert seen["slot_mapping"].tolist() == [110, 111, 112, 113, 205, 206, -1, -1]
    # B's row has 2 padding tokens after its real ones: context 7 + 2, so its queries sit at 5 and 6
    assert seen["seq_lens"].tolist() == [14, 9]
    assert seen["input_ids"][0, :6].tolist() == [11, 12, 13, 14, 21, 22]
    assert seen["position_ids"][0, :6].tolist() == [10, 11, 12, 13, 5, 6]
    assert seen["query_start_loc"].tolist() == [0, 4, 8]
    assert graphs.num_verify_padded == 1
