"""Pass-pipeline work that scales with the model's depth: counted, not timed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.fx import GraphModule

from fxllm.compiler.capture import capture
from fxllm.models import load_model
from fxllm.passes import graph_utils, pattern
from fxllm.passes.match_gated_mlp import match_gated_mlp
from fxllm.passes.pipeline import CODEGEN, PassReport, run_passes
from fxllm.passes.registry import PassContext, PassResult, register_pass, unregister_pass

aten = torch.ops.aten


def _run_gm(num_layers: int) -> tuple[GraphModule, PassReport]:
    model = load_model("tiny-llama", num_layers=num_layers).model
    captured = capture(model)
    ctx = PassContext(model_config=model.config, device=torch.device("cpu"), dtype=torch.float32)
    report = run_passes(captured.gm, ctx, include_runtime=True)
    return captured.gm, report


def _run(num_layers: int) -> tuple[str, PassReport]:
    gm, report = _run_gm(num_layers)
    return gm.code, report


def _describe(value: Any) -> Any:
    """A fake value as text: dtype, sizes, strides and offset of each tensor."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, str(value.shape), str(value.stride()), str(value.storage_offset()))
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    return repr(value)


class _NoMemo:
    """Stands in for the trace memo's context variable: every trace is made afresh."""

    def get(self) -> None:
        return None

    def set(self, _value: Any) -> None:
        return None

    def reset(self, _token: Any) -> None:
        return None


def test_pattern_traces_are_made_once_per_signature_not_per_match(monkeypatch: pytest.MonkeyPatch) -> None:
    _run(2)  # builds the patterns of this process
    before = dict(pattern.TRACE_COUNTS)
    code, report = _run(6)
    traced = pattern.TRACE_COUNTS["traced"] - before["traced"]
    reused = pattern.TRACE_COUNTS["reused"] - before["reused"]
    matches = sum(report.matches(name) for name in ("match_rope", "match_rms_norm", "match_gated_mlp"))
    assert matches == 6 + 13 + 6  # rope and the gated MLP per layer; two norms per layer and the final one
    # Inductor's matcher traces the search function again and the replacement for every match; with the
    # layers' shapes all alike, one search and one replacement trace per pattern and signature remain.
    assert traced + reused == 2 * matches
    assert traced <= 8
    # The memo changes nothing in the graph.
    monkeypatch.setattr(pattern, "_trace_memo", _NoMemo())
    memo_off_code, _ = _run(6)
    assert memo_off_code == code


def test_refresh_meta_computes_a_repeated_value_once_and_it_equals_a_fresh_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = dict(graph_utils.REFRESH_COUNTS)
    gm, _ = _run_gm(4)
    computed = graph_utils.REFRESH_COUNTS["computed"] - before["computed"]
    shared = graph_utils.REFRESH_COUNTS["shared"] - before["shared"]
    # Four layers repeat each new node's op on the same shapes: most values are shared, not computed.
    assert shared > 2 * computed > 0
    values = {n.name: _describe(n.meta.get("val")) for n in gm.graph.nodes}

    def no_signature(_value: Any) -> Any:
        raise TypeError("memo off")

    monkeypatch.setattr(graph_utils, "value_signature", no_signature)  # every value computed per node
    fresh, _ = _run_gm(4)
    assert fresh.code == gm.code
    assert {n.name: _describe(n.meta.get("val")) for n in fresh.graph.nodes} == values


def test_code_is_generated_once_and_a_user_pass_sees_it_current(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = GraphModule.recompile

    def counting(self: GraphModule) -> Any:
        calls.append(id(self))
        return original(self)

    model = load_model("tiny-llama", num_layers=2).model
    gm = capture(model).gm
    ctx = PassContext(model_config=model.config, device=torch.device("cpu"), dtype=torch.float32)
    monkeypatch.setattr(GraphModule, "recompile", counting)
    seen: list[str] = []

    @register_pass("read_code", "fuse")
    def read_code(gm: GraphModule, ctx: PassContext) -> PassResult:
        seen.append(gm.code)  # user code may read or run the module mid-pipeline
        return PassResult()

    try:
        report = run_passes(gm, ctx, include_runtime=True)
    finally:
        unregister_pass("read_code")
    assert "torch.ops.fxllm.rms_norm" in seen[0]  # the match passes' rewrites, not the captured code
    # Once before the user pass, once after the last pass: not once per pass.
    assert calls.count(id(gm)) == 2
    assert report.records[-1].name == CODEGEN
    assert "torch.ops.fxllm." not in gm.code  # lower_ops ran (canonical ops gone): the final code is current


def test_a_rewrite_whose_anchor_op_is_absent_is_never_traced() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(aten.mul.Tensor, (graph.call_function(aten.gelu.default, (x,)), x)))
    gelu_only = GraphModule(torch.nn.Module(), graph)
    assert match_gated_mlp.active_rewrites(gelu_only) == (2, 3, 4, 5)  # the four GeLU forms, not SiLU's
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(aten.mul.Tensor, (x, x)))
    plain = GraphModule(torch.nn.Module(), graph)
    built = dict(match_gated_mlp._matchers)
    result = match_gated_mlp(plain, PassContext())
    assert result.num_matches == 0 and result.notes and match_gated_mlp._matchers == built
    _run(2)  # tiny-llama: SiLU only, so only the SiLU rewrites get a matcher (if this process has none yet)
    assert (torch.float32, (0, 1)) in match_gated_mlp._matchers
    assert all(active == (0, 1) for _dtype, active in set(match_gated_mlp._matchers) - set(built))
