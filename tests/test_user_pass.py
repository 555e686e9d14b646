"""A pass registered from outside the package runs, and config switches it off."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fxllm.compiler import compile_model
from fxllm.models import load_model
from fxllm.passes.registry import unregister_pass

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-pass.md"


def _doc_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/writing-a-pass.md has no python example"
    return blocks[0]


def test_docs_worked_example_runs_and_counts() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_doc_example(), str(DOC), "exec"), namespace)  # the page's code, verbatim
    try:
        model = load_model("tiny-llama").model
        compiled = compile_model(model, backend="eager")
        assert compiled.pass_report.matches("count_linears") == 9  # 2 layers x 4 merged linears + lm_head
        off = compile_model(model, backend="eager", passes={"count_linears": {"enabled": False}})
        assert any(r.name == "count_linears" and r.status == "disabled" for r in off.pass_report.records)
    finally:
        unregister_pass("count_linears")


def test_user_pattern_pass_rewrites_and_is_numerically_checked() -> None:
    from fxllm.passes.pattern import PatternPass, Rewrite

    calls = {"n": 0}

    def search(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x)

    def replace(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)

    def check(match: object) -> bool:
        # Accept only the first candidate: proves extra_check is consulted per match and its verdict kept.
        calls["n"] += 1
        return calls["n"] == 1

    PatternPass("silu_to_sigmoid", "cleanup", [Rewrite(search, replace, lambda d: [torch.randn(4, 8, dtype=d)],
                                                       extra_check=check)])  # fmt: skip
    try:
        model = load_model("tiny-llama").model
        compiled = compile_model(model, backend="eager", passes={"match_gated_mlp": False})
        # tiny-llama has one silu per layer (2 layers): both are offered to the check, one is rewritten.
        assert calls["n"] == 2
        assert compiled.pass_report.matches("silu_to_sigmoid") == 1
        targets = [n.target for n in compiled.graph_module.graph.nodes]
        assert targets.count(torch.ops.aten.silu.default) == 1
        ids = torch.randint(3, model.config.vocab_size, (1, 10))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), model(ids).logits, atol=1e-4, rtol=0)
    finally:
        unregister_pass("silu_to_sigmoid")
