"""merge_linears: linears that read the same input (q/k/v, gate/up) -> one GEMM and slices.

One larger GEMM keeps the tensor cores busier and reads the activation once. The merged weight
is built once at compile time and the originals are dropped, so memory does not grow.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from fxllm.passes.graph_utils import (
    arg,
    drop_attr_if_unused,
    fetch_attr,
    is_op,
    one_thread,
    recompile,
    split_merged_output,
)
from fxllm.passes.registry import PassContext, PassResult, register_pass

logger = logging.getLogger(__name__)
aten = torch.ops.aten


def _weight_of(node: Node) -> Node | None:
    weight = node.args[1]
    return weight if isinstance(weight, Node) and weight.op == "get_attr" else None


def _merge_group(
    gm: GraphModule, source: Node, linears: list[Node], index: int, order: dict[Node, int]
) -> None:
    graph = gm.graph
    weights = [_weight_of(n) for n in linears]
    biases = [arg(n, 2, "bias") for n in linears]
    tensors = [fetch_attr(gm, w.target) for w in weights]  # type: ignore[union-attr]
    name = f"fxllm_merged_linear_{index}"
    gm.register_parameter(name, torch.nn.Parameter(torch.cat(tensors, 0), requires_grad=False))
    bias_name = None
    if biases[0] is not None:
        bias_name = f"{name}_bias"
        bias_tensors = [fetch_attr(gm, b.target) for b in biases]
        gm.register_parameter(bias_name, torch.nn.Parameter(torch.cat(bias_tensors, 0), requires_grad=False))
    first = min(linears, key=order.__getitem__)
    with graph.inserting_before(first):
        w_node = graph.get_attr(name)
        b_node = graph.get_attr(bias_name) if bias_name else None
        merged = graph.call_function(
            aten.linear.default, (source, w_node, b_node) if b_node else (source, w_node)
        )
        merged.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
        # Every member's weight name and module path: quantization.exclude naming any member keeps the GEMM float.
        merged.meta["fxllm_merged_from"] = [str(w.target) for w in weights] + [  # type: ignore[union-attr]
            str(list(n.meta.get("nn_module_stack", {}).values())[-1][0])
            for n in linears
            if n.meta.get("nn_module_stack")
        ]
        split_merged_output(gm, merged, linears, [t.shape[0] for t in tensors])
    for attr in [*weights, *[b for b in biases if b is not None]]:
        drop_attr_if_unused(gm, attr)


@register_pass("merge_linears", "fuse", _builtin=True)
def merge_linears(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Linears sharing an input -> one linear over concatenated weights + slices."""
    result = PassResult()
    if not ctx.weights_are_attributes:
        result.notes.append("weights are graph inputs (Dynamo graph): merging would concatenate every call")
        return result
    groups: dict[Node, list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if is_op(node, aten.linear.default) and _weight_of(node) is not None:
            groups[node.args[0]].append(node)
    # Positions of the original nodes: merging inserts new nodes before a group's first linear only,
    # so the order among the nodes still to be merged never changes.
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    with one_thread():  # the weight copies are memory-bound (graph_utils.one_thread)
        for source, linears in groups.items():
            if len(linears) < 2:
                continue
            has_bias = {arg(n, 2, "bias") is not None for n in linears}
            tensors = [fetch_attr(gm, _weight_of(n).target) for n in linears]  # type: ignore[union-attr]
            if len(has_bias) != 1 or len({(t.dtype, t.device, t.shape[1:]) for t in tensors}) != 1:
                result.notes.append(f"{source.name}: linears differ in bias/dtype/shape; not merged")
                continue
            if any(
                isinstance(arg(n, 2, "bias"), Node) and arg(n, 2, "bias").op != "get_attr" for n in linears
            ):
                continue
            _merge_group(gm, source, linears, result.num_matches, order)
            result.num_matches += 1
    if result.num_matches:
        recompile(gm)
    return result
