"""Pass-pipeline work that scales with the model's depth: counted, not timed."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fxllm.compiler.capture import capture
from fxllm.models import load_model
from fxllm.passes import pattern
from fxllm.passes.pipeline import PassReport, run_passes
from fxllm.passes.registry import PassContext


def _run(num_layers: int) -> tuple[str, PassReport]:
    model = load_model("tiny-llama", num_layers=num_layers).model
    captured = capture(model)
    ctx = PassContext(model_config=model.config, device=torch.device("cpu"), dtype=torch.float32)
    report = run_passes(captured.gm, ctx, include_runtime=True)
    return captured.gm.code, report


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
