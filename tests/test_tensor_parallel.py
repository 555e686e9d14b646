"""Tensor parallelism on the CPU (gloo, one spawned process per rank): outputs equal one rank's.

Each engine spawns its workers once for the whole module (spawning and building a rank takes
seconds). Float32, eager graphs: the TP=2 graph differs from TP=1 only in where the sums of the
row-parallel GEMMs happen, so greedy tokens must be equal and log-probabilities within 1e-4.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from collections.abc import Iterator

import pytest
import torch
from cache_roots import fresh_cache_root
from tp_outputs import PARAMS, PROMPTS, assert_same, greedy_outputs

from fxllm import LLM, SamplingParams
from fxllm.runtime.distributed import RankDied
from fxllm.runtime.distributed.sharding import check_divisible, resolve_plan

BASE = ["compile.backend=eager", "cache.num_blocks=64", "scheduler.max_num_seqs=4"]
LOGPROB_TOL = 1e-4  # float32; the all-reduce sums the row-parallel partial products in another order
_run = greedy_outputs


def _assert_same(reference: tuple, sharded: tuple) -> None:
    assert_same(reference, sharded, LOGPROB_TOL)


@contextlib.contextmanager
def _engine(model: str, *overrides: str) -> Iterator[LLM]:
    llm = LLM(model, overrides=[*BASE, *overrides])
    try:
        yield llm
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def qwen2_tp1() -> tuple:
    with _engine("tiny-qwen2") as llm:
        return _run(llm)


@pytest.fixture(scope="module")
def llama_tp1() -> tuple:
    with _engine("tiny-llama") as llm:
        return _run(llm)


@pytest.fixture(scope="module")
def llama_tp2_shared() -> Iterator[LLM]:
    """The module's shared TP=2 engine, for the tests that only read it (spawning and building the ranks is most
    of a TP test's time): the fused all-reduce + norm and the vocab-parallel embedding together, which do not
    interact (the embedding's all-reduce has two users, the first norm and the residual, so it is never fused;
    the fused norms' counts below are those of the fusion alone), then decode buckets and a killed rank."""
    with _engine(
        "tiny-llama", "parallel.tensor_parallel_size=2", "parallel.fuse_allreduce_rms_norm=true",
        "parallel.vocab_parallel_embedding=true",
    ) as llm:  # fmt: skip
        yield llm


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"compile.cache_dir={fresh_cache_root(tmp_path_factory.mktemp('fxllm_cache'))}"


def test_tp2_greedy_and_logprobs_equal_tp1_qwen2(qwen2_tp1: tuple, cache_dir: str, monkeypatch) -> None:
    """Qwen2 has q/k/v biases (split with their rows) and 2 KV heads (one per rank)."""
    monkeypatch.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)  # the warm start below needs the entry
    with _engine("tiny-qwen2", "parallel.tensor_parallel_size=2", cache_dir) as llm:
        # o_proj and down_proj of 2 layers (an all-reduce each) and the vocab-parallel LM head (an all-gather)
        assert llm.info.pass_report.matches("shard_tp") == 5
        layers = llm.engine.runner.signature.kv_layers
        assert {layer.num_kv_heads for layer in layers} == {1}  # the rank's heads only
        gm = llm.engine.runner.graph_module
        heads = [t for n, t in [*gm.named_parameters(), *gm.named_buffers()] if "lm_head" in n]
        assert [t.shape[0] for t in heads] == [256]  # the rank's half of the 512-token vocabulary
        _assert_same(qwen2_tp1, _run(llm))


def test_tp2_warm_start_binds_each_ranks_shards(qwen2_tp1: tuple, cache_dir: str, monkeypatch) -> None:
    """A second start takes every rank's graph from the compile cache (keyed by rank) and binds its
    weights from that rank's loaded shards: the outputs stay TP=1's."""
    monkeypatch.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)
    with _engine("tiny-qwen2", "parallel.tensor_parallel_size=2", cache_dir) as llm:
        assert llm.info.compile_cache == "hit"
        _assert_same(qwen2_tp1, _run(llm))


def test_tp2_speculative_verify_buckets_on_every_rank(llama_tp1: tuple) -> None:
    """n-gram speculation at TP=2 with padded decode and verify buckets: rank 0 and the worker must pad each
    verify step the same way (the step header carries the draft counts, the verify buckets go to every
    rank), or their all-reduces would disagree in size; greedy tokens stay those of the bucket-free run
    (40 tokens of a prompt whose output repeats itself, so the lookup drafts) and TP=1's (PROMPTS[1:]).
    It runs before the module's shared TP engine (llama_tp2_shared) starts: one TP engine at a time."""
    repeating = [[1, 5, 9, 33, 5, 9, 33, 5, 9, 33, 5, 9]]
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=PARAMS.max_tokens, temperature=0.0, ignore_eos=True)
    overrides = ["parallel.tensor_parallel_size=2", "speculative.method=ngram", "speculative.num_speculative_tokens=2",
                 "speculative.prompt_lookup_min=1", "parallel.collective_timeout_s=60"]  # fmt: skip
    with _engine("tiny-llama", *overrides) as llm:
        reference = [list(o.outputs[0].token_ids) for o in llm.generate(repeating, long)]
        runner = llm.engine.runner
        runner.enable_decode_graphs([1, 2, 4], 256, capture=False)
        outputs = llm.generate(repeating, long)
        assert [list(o.outputs[0].token_ids) for o in outputs] == reference
        assert outputs[0].metrics.spec_draft_tokens > 0
        assert runner.decode_graphs.num_verify_replays > 0
        assert [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS[1:], short)] == llama_tp1[0][1:]


def test_tp2_vocab_parallel_embedding_equals_tp1(llama_tp2_shared: LLM, llama_tp1: tuple) -> None:
    """The embedding table split by vocabulary rows: each rank holds half of it, looks up the ids in its
    range and the all-reduce adds the other rank's zeros, so tokens and logprobs stay TP=1's."""
    llm = llama_tp2_shared
    # 2 layers x (o_proj, down_proj) all-reduces, the LM head's all-gather, the embedding's lookup
    assert llm.info.pass_report.matches("shard_tp") == 6
    gm = llm.engine.runner.graph_module
    tables = [t for n, t in [*gm.named_parameters(), *gm.named_buffers()] if "embed_tokens" in n]
    assert [tuple(t.shape) for t in tables] == [(256, 128)]  # the rank's half of the 512-row table
    _assert_same(llama_tp1, _run(llm))


def test_tp2_fused_allreduce_norm_equals_tp1(llama_tp2_shared: LLM, llama_tp1: tuple) -> None:
    """all_reduce + residual add + RMSNorm as one op: same tokens, logprobs within the tolerance."""
    expected = llama_tp1
    assert llama_tp2_shared.info.pass_report.matches("fuse_allreduce_rms_norm") == 4
    assert "all_reduce_add_rms_norm" in llama_tp2_shared.info.op_backends
    _assert_same(expected, _run(llama_tp2_shared))


def test_tp2_decode_buckets_on_every_rank(llama_tp2_shared: LLM, llama_tp1: tuple) -> None:
    """Padded decode buckets (CUDA graphs' CPU stand-in) set up on every rank: pure decode steps go through
    them on rank 0 and, from the sampled rows in the step header, on the worker too."""
    runner, expected = llama_tp2_shared.engine.runner, llama_tp1
    runner.enable_decode_graphs([1, 2, 4], 256, capture=False)
    try:
        _assert_same(expected, _run(llama_tp2_shared))
        assert runner.decode_graphs.num_replays > 0 and runner.decode_graphs.num_too_large == 0
    finally:
        runner._runner.decode_graphs = None  # the rest of the module runs the plain path


def test_size_that_splits_heads_fails_before_spawning() -> None:
    with pytest.raises(ValueError, match=r"does not divide the model's num_attention_heads \(4\).*\[1, 2\]"):
        LLM("tiny-llama", overrides=[*BASE, "parallel.tensor_parallel_size=3"])
    with pytest.raises(ValueError, match=r"parallel\.tensor_parallel_size: must be >= 1"):
        LLM("tiny-llama", overrides=[*BASE, "parallel.tensor_parallel_size=0"])


def test_plan_from_tp_plan_and_structural_rule() -> None:
    from fxllm.models import load_model

    model = load_model("tiny-llama", device="meta").model
    plan, source = resolve_plan(model)
    assert source == "tp_plan"
    assert plan["model.layers.0.self_attn.k_proj"] == "colwise"
    assert plan["model.layers.1.mlp.down_proj"] == "rowwise"
    assert "lm_head" not in plan
    assert resolve_plan(model, vocab_parallel=True, size=2)[0] == {**plan, "lm_head": "vocab"}
    assert "lm_head" not in resolve_plan(model, vocab_parallel=True, size=3)[0]  # 512 rows do not split in 3
    model.config.base_model_tp_plan = None
    structural, source = resolve_plan(model)
    assert source == "structural" and structural == plan
    split = resolve_plan(model, vocab_parallel_embedding=True, size=2)[0]
    assert split == {**plan, "model.embed_tokens": "vocab_embedding"}
    assert "model.embed_tokens" not in resolve_plan(model, vocab_parallel_embedding=True, size=3)[0]
    model.config.tie_word_embeddings = True  # a tied head would split the embedding table with it
    assert "lm_head" not in resolve_plan(model, vocab_parallel=True, size=2)[0]
    assert "model.embed_tokens" not in resolve_plan(model, vocab_parallel_embedding=True, size=2)[0]
    with pytest.raises(ValueError, match="num_key_value_heads"):
        check_divisible(type("C", (), {"num_attention_heads": 8, "num_key_value_heads": 2})(), 4)


def test_compile_explain_shows_shard_plan_and_all_reduce() -> None:
    from fxllm.serve.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["compile", "tiny-llama", "--explain", "--backend", "eager",
                     "--set", "parallel.tensor_parallel_size=2"]) == 0  # fmt: skip
    text = out.getvalue()
    assert "rank 0 of 2 (tp_plan): 10 column-parallel and 4 row-parallel linears, 4 fxllm::all_reduce" in text
    assert "all_reduce -> inlined" in text  # the CPU's implementation: functional collectives, traced


def test_killed_rank_ends_the_run_with_an_error(llama_tp2_shared: LLM) -> None:
    """Last in the module: it kills the shared engine's worker."""
    group = llama_tp2_shared.engine.runner.group
    reasons: list[str] = []
    group.on_death = reasons.append  # `fxllm serve` sends itself SIGTERM here
    os.kill(group.procs[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RankDied, match="rank 1 exited"):
        llama_tp2_shared.generate(PROMPTS, PARAMS)
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 5
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reasons == ["tensor-parallel rank 1 exited with code -9"]
    assert torch.distributed.is_initialized()  # shutdown (the fixture's) leaves the group


def test_worker_step_inputs_are_tensors_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's step tensors arrive packed in one broadcast buffer; each must come out as a tensor of its
    own, with the step's draft counts, not a view of that buffer (Dynamo guards a view on its base: views made the workers alone
    recompile the graph). The broadcast is replaced by a copy of what rank 0 would send."""
    import torch.distributed as dist

    from fxllm.runtime.distributed.channel import STEP_FIELDS, receive_step, step_header
    from fxllm.runtime.step_inputs import StepInputs

    inputs = StepInputs(
        input_ids=torch.tensor([[5, 6, 7]]), position_ids=torch.tensor([[0, 1, 2]]),
        slot_mapping=torch.tensor([0, 1, 2]), block_tables=torch.tensor([[0]], dtype=torch.int32),
        seq_lens=torch.tensor([3], dtype=torch.int32), query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
        logits_indices=torch.tensor([2]), sampled=[0], draft_counts=[2],
    )  # fmt: skip
    packed = torch.cat([getattr(inputs, f).reshape(-1).to(torch.int64) for f in STEP_FIELDS])
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src: tensor.copy_(packed))
    received = receive_step(step_header(inputs), torch.device("cpu"))
    for name in STEP_FIELDS:
        tensor, sent = getattr(received, name), getattr(inputs, name)
        assert tensor._base is None, name
        assert tensor.dtype == sent.dtype and torch.equal(tensor, sent), name
    # The host-side lists decide the CUDA-graph bucket and a verify step's padding: the same on every rank.
    assert (received.sampled, received.draft_counts, received.prompt_rows) == ([0], [2], [])
