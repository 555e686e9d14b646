"""gather_logits: compute the LM head only for the tokens that will be sampled.

A prefill of 500 tokens needs logits for its last token alone; projecting all 500 onto a
50k-entry vocabulary would be most of the step's work. The graph gains a `logits_indices` input
(positions in the flat token dimension) and returns logits [1, len(logits_indices), V].

The LM head is found by walking back from the graph's output through ops that act on each token
on its own (dtype casts, final logit soft-capping, views), to the projection that produces them.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Node

import fxllm.ops.collectives  # noqa: F401  (defines fxllm::all_gather)
from fxllm.passes.graph_utils import is_op, recompile
from fxllm.passes.insert_cached_attention import add_input
from fxllm.passes.registry import PassContext, PassResult, register_pass
from fxllm.passes.runtime_signature import ensure_signature

aten = torch.ops.aten
logger = logging.getLogger(__name__)

# Per-token ops allowed between the LM head and the output: they commute with picking token rows. The
# all-gather after a vocabulary-parallel LM head (shard_tp, which runs before this pass) joins each token's
# logits across ranks along the last dimension, so it is one of them.
_PER_TOKEN = (
    aten.to, aten._to_copy, aten.contiguous, aten.clone, aten.alias, aten.view, aten.reshape,
    aten.div, aten.mul, aten.tanh, aten.add, aten.sub, torch.ops.fxllm.all_gather,
)  # fmt: skip
_PROJECTIONS = (aten.linear, torch.ops.fxllm.packed_linear)


def find_lm_head(gm: GraphModule) -> Node | None:
    """The projection whose output the graph returns (through per-token ops only), or None."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    result = output.args[0]
    node = result[0] if isinstance(result, (tuple, list)) else result
    while isinstance(node, Node) and node.op == "call_function":
        if is_op(node, *_PROJECTIONS):
            return node
        if not is_op(node, *_PER_TOKEN):
            return None
        inputs = [a for a in node.args if isinstance(a, Node)]
        if len(inputs) != 1:  # e.g. logits * a tensor: not provably per-token
            return None
        node = inputs[0]
    return None


def _describe_output(gm: GraphModule) -> str:
    """The first few ops walking back from the graph's output (what stopped `find_lm_head`)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    result = output.args[0]
    node, chain = (result[0] if isinstance(result, (tuple, list)) else result), []
    while isinstance(node, Node) and len(chain) < 4:
        chain.append(str(node.target))
        inputs = [a for a in node.args if isinstance(a, Node)]
        node = inputs[0] if inputs else None
    return " <- ".join(chain)


@register_pass("gather_logits", "cache", needs_runtime=True, _builtin=True)
def gather_logits(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Index the final hidden states with `logits_indices` before the LM head."""
    result = PassResult()
    lm_head = find_lm_head(gm)
    if lm_head is None:
        note = "no LM head found walking back from the output: logits for every token are returned"
        # A slow path (a prefill projects every prompt token onto the vocabulary): said, not silent.
        logger.warning("gather_logits: %s (output produced by %s)", note, _describe_output(gm))
        result.notes.append(note)
        return result
    indices = add_input(gm, "logits_indices", "logits_indices", [None], torch.long)
    hidden = lm_head.args[0]
    with gm.graph.inserting_before(lm_head):
        picked = gm.graph.call_function(aten.index_select.default, (hidden, 1, indices))
    lm_head.replace_input_with(hidden, picked)
    ensure_signature(gm).logits_rows = "logits_indices"
    recompile(gm)
    result.num_matches = 1
    return result
