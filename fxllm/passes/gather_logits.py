"""gather_logits: compute the LM head only for the tokens that will be sampled.

A prefill of 500 tokens needs logits for its last token alone; projecting all 500 onto a
50k-entry vocabulary would be most of the step's work. The graph gains a `logits_indices` input
(positions in the flat token dimension) and returns logits [1, len(logits_indices), V].
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxllm.passes.graph_utils import is_op
from fxllm.passes.insert_cached_attention import add_placeholder
from fxllm.passes.registry import PassContext, PassResult, register_pass


@register_pass("gather_logits", "cache", needs_runtime=True, _builtin=True)
def gather_logits(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Index the final hidden states with `logits_indices` before the LM head."""
    linears = [n for n in gm.graph.nodes if is_op(n, torch.ops.aten.linear.default)]
    result = PassResult()
    if not linears:
        result.notes.append("no linear layer found: cannot locate the LM head")
        return result
    lm_head = linears[-1]  # the LM head is the last projection of a causal LM
    indices = add_placeholder(gm, "logits_indices", [None], torch.long)
    hidden = lm_head.args[0]
    with gm.graph.inserting_before(lm_head):
        picked = gm.graph.call_function(torch.ops.aten.index_select.default, (hidden, 1, indices))
    lm_head.replace_input_with(hidden, picked)
    gm.recompile()
    result.num_matches = 1
    return result
