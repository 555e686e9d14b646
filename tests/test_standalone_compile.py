"""Warm start without Dynamo: the runtime graph is compiled once by `standalone_compile` for every step shape,
its artifact kept in the compile-cache entry; a warm start loads it and runs what the cold start ran; a
damaged artifact is logged, removed and rebuilt (issue 13)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from cache_roots import usual_compiled_code_dirs

from fxllm import LLM, SamplingParams
from fxllm.compiler.standalone import StandaloneGraph, symbolic_inputs
from fxllm.runtime.step_inputs import StepInputs

# tiny-llama through Inductor, weights not frozen (a frozen graph leaves no artifact to save).
BASE = [
    "model.model=tiny-llama",
    "compile.backend=inductor",
    "compile.cpu_freezing=off",
    "cache.num_blocks=64",
]
# Batch 1 decodes one token a step (the one-token shape Dynamo compiled a variant of its own for); the
# batch of three prefills 5, 3 and 40 tokens together and decodes three at a time.
ALONE = [[1, 2, 3, 4, 5]]
BATCH = [[1, 2, 3, 4, 5], [7, 8, 9], [11] * 40]


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache root (no graphs, no artifacts); the C++ kernels are loaded first from the usual place, and
    Inductor's and Triton's caches are the usual ones (the artifact under test is fxllm's, in the root)."""
    from fxllm.backends.cpu import native

    native.available()
    for name, value in usual_compiled_code_dirs().items():  # restored at teardown
        monkeypatch.setenv(name, value)
    root = tmp_path / "fxllm-cache"
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(root))
    monkeypatch.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)
    return root


def _forward(llm: LLM) -> StandaloneGraph:
    forward = llm.engine.runner._forward
    assert isinstance(forward, StandaloneGraph)
    return forward


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    return [list(o.outputs[0].token_ids) for o in outs]


def _logits(llm: LLM) -> torch.Tensor:
    """Logits of one fixed 5-token prefill through the runner."""
    n = 5
    inputs = StepInputs(
        input_ids=torch.arange(1, n + 1)[None], position_ids=torch.arange(n)[None], slot_mapping=torch.arange(n),
        block_tables=torch.tensor([[0]], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), logits_indices=torch.tensor([n - 1]), sampled=[0],
    )  # fmt: skip
    return llm.engine.runner.execute(inputs)


def _artifact(root: Path) -> Path:
    (path,) = list((root / "graphs").glob("*/inductor-*.bin"))
    return path


def test_warm_start_loads_the_artifact_and_matches_the_cold_start(cache_dir: Path) -> None:
    cold = LLM(overrides=BASE)
    assert _forward(cold).source == "compiled"
    # One compile served the warm-up's varied shapes (its check rounds would have compiled more).
    assert cold.engine.runner.num_compiles == 1 and cold.engine.compile_settled
    expected = (_logits(cold), _greedy(cold, ALONE), _greedy(cold, BATCH))
    assert cold.engine.runner.num_compiles == 1  # and the one-token decode steps needed nothing new
    record = json.loads(_artifact(cache_dir).with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(_artifact(cache_dir).read_bytes()).hexdigest()
    del cold
    warm = LLM(overrides=BASE)
    assert warm.build_info.compile_cache == "hit"
    assert _forward(warm).source == "loaded" and warm.engine.runner.num_compiles == 0
    logits, alone, batch = _logits(warm), _greedy(warm, ALONE), _greedy(warm, BATCH)
    assert torch.equal(logits, expected[0])  # the same compiled code on the same weights: bit for bit
    assert (alone, batch) == expected[1:]
    assert warm.engine.runner.num_compiles == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "not_an_artifact"])
def test_a_damaged_artifact_is_logged_removed_and_rebuilt(
    cache_dir: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    expected = _greedy(LLM(overrides=BASE), BATCH)
    path = _artifact(cache_dir)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    else:  # the checksum matches, the load fails
        junk = b"not an Inductor artifact"
        path.write_bytes(junk)
        path.with_suffix(".json").write_text(
            json.dumps({"bytes": len(junk), "sha256": hashlib.sha256(junk).hexdigest()})
        )
    with caplog.at_level(logging.WARNING, logger="fxllm.compiler.standalone"):
        rebuilt = LLM(overrides=BASE)
    assert "is unusable" in caplog.text and "removing it and compiling" in caplog.text
    assert rebuilt.build_info.compile_cache == "hit"  # the post-pass graph was fine
    assert _forward(rebuilt).source == "compiled"
    assert _greedy(rebuilt, BATCH) == expected
    # Written again, whole (not byte-equal to the first: the saved cache bundle is not deterministic).
    record = json.loads(_artifact(cache_dir).with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(_artifact(cache_dir).read_bytes()).hexdigest()
    assert _forward(LLM(overrides=BASE)).source == "loaded"


def test_step_sizes_are_symbols_shared_across_inputs() -> None:
    """Tokens, sequences, block-table width, sampled rows and the pool's block count are symbols; the KV
    caches share one block count; everything else keeps its size."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fxllm.passes.runtime_signature import GraphInput, KVCacheLayer, RuntimeSignature

    roles = ["input_ids", "position_ids", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
             "k_cache", "v_cache", "logits_indices"]  # fmt: skip
    signature = RuntimeSignature(
        [GraphInput(r, r, torch.long, 0 if "cache" in r else None) for r in roles],  # type: ignore[arg-type]
        [KVCacheLayer(0, "k_cache", "v_cache", 2, 8, 8, torch.float32)],
    )
    args = [torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), torch.zeros(4),
            torch.zeros(1, 2), torch.zeros(1), torch.zeros(2), torch.zeros(9, 16, 2, 8), torch.zeros(9, 16, 2, 8),
            torch.zeros(1)]  # fmt: skip
    fake = symbolic_inputs(signature, args, FakeTensorMode(shape_env=ShapeEnv()))
    shapes = [tuple(str(s) for s in f.shape) for f in fake]
    tokens, seqs = shapes[0][1], shapes[3][0]
    assert shapes[0] == shapes[1] == ("1", tokens) and shapes[2] == (tokens,)
    assert shapes[4] == (seqs,) and shapes[5] == (f"{seqs} + 1",)
    assert shapes[6] == shapes[7] and shapes[6][1:] == ("16", "2", "8") and not shapes[6][0].isdigit()
    assert len({tokens, seqs, shapes[3][1], shapes[8][0], shapes[6][0]}) == 5
