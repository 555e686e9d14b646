"""The lowering pass: each canonical op node gets its implementation, chosen per graph, written in the graph."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from fxllm.backends.registry import OpSite, choose_implementation, register_op_backend, unregister_op_backend
from fxllm.compiler.api import compile_model
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.passes.lower_ops import lowering_decisions
from fxllm.runtime.sampling_params import SamplingParams

PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
CALLS = {"silu_and_mul": 0}


def _counting_silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    CALLS["silu_and_mul"] += 1
    return (F.silu(gate) * up).contiguous()


@pytest.fixture(scope="module")
def counting_backend() -> Iterator[str]:
    """A Python backend of silu_and_mul that counts its calls; priority 0, so it runs only where named."""
    register_op_backend("silu_and_mul", "counting", _counting_silu_and_mul)
    yield "counting"
    unregister_op_backend("silu_and_mul", "counting")


def _canonical_nodes(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("fxllm.")]


def _greedy_hf(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
            outs.append(out[0, len(ids) :].tolist())
    return outs


def test_two_engines_in_one_process_each_run_their_own_choice(counting_backend: str) -> None:
    """Engine A names the counting backend for silu_and_mul, engine B the reference: only A's steps call
    it, before and after B was built, and both equal HF greedy (no process-global kernel binding)."""
    hf = load_model("tiny-llama").model
    expected = _greedy_hf(hf, PROMPTS, 6)
    base = ["model.model=tiny-llama", "compile.backend=eager", "cache.num_blocks=64"]
    llm_a = LLM(overrides=[*base, f"compile.op_backends.silu_and_mul={counting_backend}"])
    llm_b = LLM(overrides=[*base, "compile.op_backends.silu_and_mul=torch"])
    assert llm_a.build_info.op_backends["silu_and_mul"] == counting_backend
    assert llm_b.build_info.op_backends["silu_and_mul"] == "torch"
    params = SamplingParams(max_tokens=6, temperature=0)
    for llm, counts in ((llm_b, False), (llm_a, True), (llm_b, False)):
        before = CALLS["silu_and_mul"]
        outs = llm.generate(PROMPTS, params)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert (CALLS["silu_and_mul"] > before) == counts


def test_explain_lists_every_op_node_and_no_canonical_node_remains() -> None:
    model = load_model("tiny-llama").model
    compiled = compile_model(model, backend="eager")
    gm = compiled.graph_module
    assert _canonical_nodes(gm) == []
    decisions = lowering_decisions(gm)
    # 2 layers: 2 attention, 2 rope, 2 silu_and_mul, 1 rms_norm + 4 fused add+norm (golden counts of the passes).
    assert sorted(d.op for d in decisions).count("attention") == 2
    # Linears are lowered too where this CPU packs them (fxllm's AVX-512 kernel or oneDNN): machine-dependent.
    assert len([d for d in decisions if d.op not in ("linear", "packed_linear")]) == 11
    report = compiled.report()
    assert "implementations (lower_ops)" in report
    for d in decisions:
        assert d.node in report
    attention = [d for d in decisions if d.op == "attention"]
    assert {d.target for d in attention} == {"fxllm_torch.attention.default"}  # reference, opaque
    assert {d.target for d in decisions if d.op == "rms_norm"} == {"inlined"}
    # Lowered nodes carry their decision in node.meta, so the graph alone says what runs.
    kept = [n for n in gm.graph.nodes if "fxllm_lowering" in n.meta]
    assert len(kept) == len([d for d in decisions if d.target != "inlined"])
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids).logits, atol=1e-5, rtol=1e-5)


def test_preference_is_checked_against_the_node() -> None:
    model = load_model("tiny-llama").model
    with pytest.raises(Exception, match="unknown backend 'nope'"):
        compile_model(model, backend="eager", op_backends={"rms_norm": "nope"})
    with pytest.raises(Exception, match="unknown op 'not_an_op'"):
        compile_model(model, backend="eager", op_backends={"not_an_op": "torch"})


def test_shape_dependent_choice_and_logged_fallback(caplog: pytest.LogCaptureFixture) -> None:
    """A backend's capability check sees each node's arguments (here: only 4-D rope inputs); one whose
    op fails to load is skipped with one warning that counts the nodes that fell back."""
    calls: list[int] = []

    def rope(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        calls.append(q.dim())
        half = q.shape[-1] // 2

        def rotate(x: torch.Tensor) -> torch.Tensor:
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        return (q * cos + rotate(q) * sin).contiguous(), (k * cos + rotate(k) * sin).contiguous()

    register_op_backend(
        "rotary_embedding", "test4d", rope, supports=lambda s: s.args[0].dim() == 4, priority=50
    )
    register_op_backend("rms_norm", "broken", target=lambda: None, priority=50)
    try:
        site3d = OpSite("rotary_embedding", torch.device("cpu"), (torch.empty(2, 3, 4),))
        assert choose_implementation(site3d).backend == "torch"
        model = load_model("tiny-llama").model
        with caplog.at_level(logging.WARNING, logger="fxllm.passes.lower_ops"):
            compiled = compile_model(model, backend="eager")
        chosen = {d.op: d for d in lowering_decisions(compiled.graph_module)}
        assert chosen["rotary_embedding"].target == "fxllm_test4d.rotary_embedding.default"
        assert chosen["rms_norm"].fallback and chosen["rms_norm"].target == "inlined"
        assert "5 node(s) fell back to the reference" not in caplog.text  # rms_norm only, not fused_add
        assert (
            "1 node(s) fell back to the reference: rms_norm (fallback: broken failed to load) x1"
            in caplog.text
        )
        ids = torch.randint(0, model.config.vocab_size, (1, 7))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), model(ids).logits, atol=1e-5, rtol=1e-5)
        assert calls and set(calls) == {4}
    finally:
        unregister_op_backend("rotary_embedding", "test4d")
        unregister_op_backend("rms_norm", "broken")
