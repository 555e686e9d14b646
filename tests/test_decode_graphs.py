"""Decode buckets: steps padded to a bucket give the same greedy tokens as HF generate.

The CUDA graph itself is captured only on a GPU (benchmarks/gpu.py checks that); here the identical
padded path runs without capture, which is what can go wrong on the host side: the padding rows
(slot -1, length 1), stale block-table columns from earlier larger steps, and the bucket choice.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_fixtures import first_layers

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
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
def hf():
    """SmolLM2's first 4 layers: the padding and bucket logic does not depend on depth, capture and
    passes take a seventh of the time."""
    return first_layers(load_model("smollm2"), 4)


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
