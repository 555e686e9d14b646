"""Step-size limits from Inductor's 32-bit-indexing guards (fxllm/compiler/size_limits.py) and their check per
call in the standalone graph: a step above a limit runs through Dynamo, counted; one below runs the artifact."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fxllm.compiler import backends
from fxllm.compiler.size_limits import ShapeAssumption, first_violation, limits_from_guards, size_checks
from fxllm.compiler.standalone import StandaloneGraph
from fxllm.passes.runtime_signature import GraphInput, RuntimeSignature

INT32_MAX = 2**31 - 1


def _sizes(env: ShapeEnv, **hints: int) -> dict[str, Any]:
    return {
        n: env.create_symintnode(env.create_symbol(h, ConstantSource(n)), hint=h) for n, h in hints.items()
    }


def test_index_guards_become_one_limit_per_size() -> None:
    env = ShapeEnv()
    s = _sizes(env, tokens=61, rows=5, seqs=3)
    # What Inductor's Triton code generation asks (H100, the 8B preset): element counts that fit in int32.
    assert bool(4096 * s["tokens"] <= INT32_MAX) and bool(128 * s["tokens"] <= INT32_MAX)
    assert bool(128256 * s["rows"] < 2**31)
    limits = limits_from_guards([g.expr for g in env.guards], {n: v.node.expr for n, v in s.items()})
    # The tightest bound per size; sizes no guard names have no limit.
    assert limits == {"tokens": INT32_MAX // 4096, "rows": (2**31 - 1) // 128256}
    assert 4096 * limits["tokens"] <= INT32_MAX < 4096 * (limits["tokens"] + 1)


def test_any_other_guard_is_a_shape_assumption() -> None:
    env = ShapeEnv()
    s = _sizes(env, tokens=61, seqs=3)
    assert bool(s["tokens"] > 2 * s["seqs"])  # two sizes: not a limit on one
    with pytest.raises(ShapeAssumption, match="assumed"):
        limits_from_guards([g.expr for g in env.guards], {n: v.node.expr for n, v in s.items()})


def _signature() -> RuntimeSignature:
    roles = [
        "input_ids",
        "position_ids",
        "slot_mapping",
        "block_tables",
        "seq_lens",
        "logits_indices",
        "k_cache",
    ]
    return RuntimeSignature(inputs=[GraphInput(f"arg{i}", r, torch.long) for i, r in enumerate(roles)])  # type: ignore[arg-type]


def _step(tokens: int, rows: int) -> list[torch.Tensor]:
    return [torch.zeros(1, tokens), torch.zeros(1, tokens), torch.zeros(tokens), torch.zeros(2, 4),
            torch.zeros(2), torch.zeros(rows), torch.zeros(9, 16, 2, 8)]  # fmt: skip


def test_checks_read_each_size_where_the_step_holds_it() -> None:
    checks = size_checks(_signature(), {"tokens": 100, "rows": 7, "num_blocks": 9})
    assert [(c.name, c.index, c.dim) for c in checks] == [
        ("num_blocks", 6, 0),
        ("rows", 5, 0),
        ("tokens", 0, -1),
    ]
    assert first_violation(checks, _step(100, 7)) is None
    over = first_violation(checks, _step(101, 7))
    assert over is not None and over.name == "tokens"
    over = first_violation(checks, _step(3, 8))
    assert over is not None and over.name == "rows"


def test_a_step_above_a_limit_runs_through_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    dynamo_calls: list[int] = []

    class FakeDynamoGraph:
        num_compiles = 1

        def __init__(self, gm: Any, settings: Any) -> None:
            pass

        def __call__(self, *step: torch.Tensor) -> str:
            dynamo_calls.append(step[0].shape[-1])
            return "dynamo"

    monkeypatch.setattr(backends, "InductorGraph", FakeDynamoGraph)
    graph = StandaloneGraph.__new__(StandaloneGraph)
    graph.signature, graph.limits, graph.source = _signature(), {"tokens": 100}, "compiled"
    graph.gm, graph.settings, graph._oversized, graph.num_oversized = None, {}, None, 0  # type: ignore[assignment]
    monkeypatch.setattr(graph, "_prepare_artifact", lambda args: lambda *step: "artifact")
    fn = graph._prepare(_step(61, 5))
    assert fn(*_step(100, 5)) == "artifact" and dynamo_calls == []
    assert (
        fn(*_step(101, 5)) == "dynamo" and fn(*_step(4000, 5)) == "dynamo" and fn(*_step(1, 1)) == "artifact"
    )
    assert dynamo_calls == [101, 4000] and graph.num_oversized == 2
