"""fuse_add_rms_norm: residual add followed by fxllm::rms_norm -> fxllm::fused_add_rms_norm.

The sum stays a graph value (the next residual), so one kernel reads x and residual once and
writes both the normalised output and the new residual.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from fxllm.passes.graph_utils import is_op, recompile, val
from fxllm.passes.registry import PassContext, PassResult, register_pass

aten = torch.ops.aten


def _defined_before(node: object, anchor: Node, order: dict[Node, int]) -> bool:
    return not isinstance(node, Node) or order[node] < order[anchor]


@register_pass("fuse_add_rms_norm", "fuse", _builtin=True)
def fuse_add_rms_norm(gm: GraphModule, ctx: PassContext) -> PassResult:
    """add(x, residual) -> rms_norm  ==>  fused_add_rms_norm(x, residual)."""
    graph = gm.graph
    result = PassResult()
    order = {node: i for i, node in enumerate(graph.nodes)}
    for norm in list(graph.nodes):
        if not is_op(norm, torch.ops.fxllm.rms_norm.default):
            continue
        summed, weight, eps = norm.args
        if not is_op(summed, aten.add.Tensor) or len(summed.args) != 2 or summed.kwargs:
            continue
        x, residual = summed.args
        vx, vr = val(x), val(residual)
        if not (isinstance(vx, torch.Tensor) and isinstance(vr, torch.Tensor)) or vx.shape != vr.shape:
            continue
        if not _defined_before(weight, summed, order):
            continue
        with graph.inserting_after(summed):
            fused = graph.call_function(
                torch.ops.fxllm.fused_add_rms_norm.default, (x, residual, weight, eps)
            )
        with graph.inserting_after(fused):
            normed = graph.call_function(operator.getitem, (fused, 0))
        with graph.inserting_after(normed):
            new_sum = graph.call_function(operator.getitem, (fused, 1))
        for new in (fused, normed, new_sum):
            new.meta["nn_module_stack"] = norm.meta.get("nn_module_stack", {})
        # Later matches in this same pass test these nodes' shapes, so give them values now.
        normed.meta["val"], new_sum.meta["val"] = val(norm), val(summed)
        fused.meta["val"] = (val(norm), val(summed))
        norm.replace_all_uses_with(normed)
        summed.replace_all_uses_with(new_sum)
        graph.erase_node(norm)
        graph.erase_node(summed)
        # The new nodes stand where `summed` stood (its neighbours keep their positions): no renumbering.
        order[fused] = order[normed] = order[new_sum] = order[summed]
        result.num_matches += 1
    if result.num_matches:
        recompile(gm)
    return result
