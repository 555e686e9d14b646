"""gather_logits: the LM head projects only the sampled rows, and a graph where it cannot say so warns."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.fx import GraphModule

import fxllm.ops.collectives  # noqa: F401  (fxllm::all_gather)
from fxllm.passes.gather_logits import find_lm_head, gather_logits
from fxllm.passes.registry import PassContext

aten = torch.ops.aten


def _graph(ending: str) -> GraphModule:
    """hidden [1, T, 8] -> norm-ish mul -> LM head [V=16], then `ending` before the output."""
    graph = torch.fx.Graph()
    hidden = graph.placeholder("hidden")
    weight = graph.placeholder("lm_head_weight")
    scaled = graph.call_function(aten.mul.Tensor, (hidden, 2.0))
    logits = graph.call_function(aten.linear.default, (scaled, weight))
    if ending == "softcap":  # per-token ops between head and output: the head is still found
        logits = graph.call_function(
            aten.tanh.default, (graph.call_function(aten.div.Tensor, (logits, 30.0)),)
        )
    elif ending == "all_gather":  # a vocabulary-parallel head's logits joined across ranks (shard_tp)
        logits = graph.call_function(torch.ops.fxllm.all_gather.default, (logits, "0", 2))
    elif ending == "sum_over_tokens":  # mixes tokens: picking rows first would change the result
        logits = graph.call_function(aten.cumsum.default, (logits, 1))
    graph.output((logits,))
    return GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("ending", ["plain", "softcap", "all_gather"])
def test_lm_head_found_through_per_token_ops(ending: str) -> None:
    gm = _graph(ending)
    head = find_lm_head(gm)
    assert head is not None and head.target is aten.linear.default


def test_no_head_found_warns_and_names_what_stopped_it(caplog: pytest.LogCaptureFixture) -> None:
    gm = _graph("sum_over_tokens")
    with caplog.at_level(logging.WARNING, logger="fxllm.passes.gather_logits"):
        result = gather_logits(gm, PassContext.__new__(PassContext))
    assert result.num_matches == 0
    assert "logits for every token" in result.notes[0]
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "aten.cumsum.default" in warning.getMessage()


def test_rows_are_picked_before_a_vocab_parallel_heads_all_gather() -> None:
    """The index_select lands before the LM head, so the all-gather moves only the sampled rows."""
    gm = _graph("all_gather")
    ctx = PassContext.__new__(PassContext)
    result = gather_logits(gm, ctx)
    assert result.num_matches == 1
    head = find_lm_head(gm)
    assert head is not None and head.args[0].target is aten.index_select.default
    gather = next(iter(head.users))
    assert gather.target is torch.ops.fxllm.all_gather.default
