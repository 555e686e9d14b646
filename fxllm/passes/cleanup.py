"""cleanup: drop what capture leaves behind that no kernel needs.

Runtime shape asserts, casts to the dtype a tensor already has, aliases, inference-mode dropout
and whole-dimension slices all block pattern matching (patterns are traced without them) and do
no work.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxllm.passes.graph_utils import arg, is_noop_slice, is_op, recompile, val
from fxllm.passes.registry import PassContext, PassResult, register_pass

aten = torch.ops.aten
_ASSERTS = (
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_async.msg,
)


def _is_noop_cast(node: torch.fx.Node) -> bool:
    if not is_op(node, aten.to.dtype, aten._to_copy.default):
        return False
    src, out = val(node.args[0]), val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    extra = {k: v for k, v in node.kwargs.items() if k not in ("dtype", "copy", "non_blocking")}
    return (
        not extra and src.dtype == out.dtype and src.device == out.device and not arg(node, 3, "copy", False)
    )


def _is_noop_dropout(node: torch.fx.Node) -> bool:
    return is_op(node, aten.dropout.default) and (
        arg(node, 1, "p", 0.0) == 0.0 or not arg(node, 2, "train", True)
    )


def normalize_graph(gm: GraphModule) -> int:
    """Apply the cleanup rewrites in place; returns how many nodes were removed."""
    graph = gm.graph
    removed = 0
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or (
            node.op == "call_function" and node.target in _ASSERTS and not node.users
        ):
            graph.erase_node(node)
            removed += 1
        elif (
            _is_noop_cast(node)
            or _is_noop_dropout(node)
            or is_noop_slice(node)
            or is_op(node, aten.alias.default, aten.detach.default)
        ):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    removed += _dead_code(gm)
    if removed:
        recompile(gm)
    return removed


def _dead_code(gm: GraphModule) -> int:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    return before - len(gm.graph.nodes)


@register_pass("cleanup", "cleanup", _builtin=True)
def cleanup(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Remove shape asserts, no-op casts/slices/dropout and dead code."""
    removed = normalize_graph(gm)
    return PassResult(num_matches=removed)
