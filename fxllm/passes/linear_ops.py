"""linear_ops: on CUDA, constant-weight `aten.linear` -> `fxllm::linear`, so lower_ops picks its kernel.

What the lowering then chooses is in the graph and in `--explain`: the Triton backend (a GEMV for
decode-sized M, cuBLAS above; fxllm/backends/triton/gemv.py) or the reference, inlined back to
`aten.linear`. Other devices keep `aten.linear` (oneDNN through Inductor, or pack_linears on the CPU).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import fxllm.ops.gemm  # noqa: F401  (defines fxllm::linear)
from fxllm.passes.graph_utils import constant_linears, recompile
from fxllm.passes.registry import PassContext, PassResult, register_pass


@register_pass("linear_ops", "lower", _builtin=True)
def linear_ops(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite constant-weight 2-D linears into fxllm::linear (CUDA only)."""
    result = PassResult()
    if ctx.device.type != "cuda":
        result.notes.append(f"{ctx.device.type}: aten.linear stays (the GEMV kernel is for CUDA)")
        return result
    for linear in constant_linears(gm, result.notes):
        if linear.tensor.dim() != 2:
            continue
        node = linear.node
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(
                torch.ops.fxllm.linear.default, (node.args[0], linear.weight, linear.bias)
            )
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        result.num_matches += 1
    if result.num_matches:
        recompile(gm)
    return result
