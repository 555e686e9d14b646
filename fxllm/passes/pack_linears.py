"""pack_linears: on the CPU, `aten.linear` -> `fxllm::packed_linear` over a weight packed once.

oneDNN reaches about 40 GB/s on SmolLM2's batch-1 GEMVs on the 2-core dev box; the packed
kernel streams each block of 16 output rows as one run of 64-byte loads and reaches the
machine's read bandwidth (fxllm/backends/cpu/csrc/linear.cpp has the numbers). The plain weight is
dropped unless something else reads it (a tied embedding), so memory does not grow. A linear the packed
kernel cannot take (no AVX-512, as on the 2-core dev box) becomes `fxllm::linear`, so the lowering picks
its implementation: oneDNN over a weight it packs on the first call (fxllm/backends/cpu/onednn_linear.py,
which replaces Inductor's weight freezing and keeps the compiled graph cacheable), else the reference,
inlined back to `aten.linear`.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import fxllm.ops.gemm  # noqa: F401  (defines fxllm::linear)
from fxllm.ops.linear import pack_linear_weight
from fxllm.passes.graph_utils import constant_linears, drop_attr_if_unused, recompile
from fxllm.passes.registry import PassContext, PassResult, register_pass


def _packable(tensor: torch.Tensor) -> str | None:
    """Why a constant weight cannot be packed, or None when it can."""
    from fxllm.backends.cpu.linear import available

    if tensor.dim() != 2 or not available(tensor.dtype):
        return f"no CPU kernel for a {tensor.dtype} weight of shape {tuple(tensor.shape)} on this machine"
    if tensor.dtype == torch.bfloat16 and tensor.shape[1] % 2:
        return "bfloat16 weight with an odd number of input features"
    return None


@register_pass("pack_linears", "lower", _builtin=True)
def pack_linears(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace constant-weight linears with packed_linear (AVX-512), the others with fxllm::linear (CPU only)."""
    result = PassResult()
    if ctx.device.type != "cpu":
        result.notes.append(f"{ctx.device.type}: the packed kernel is CPU-only")
        return result
    if not ctx.weights_are_attributes:
        result.notes.append("weights are graph inputs (Dynamo graph): they would be packed every call")
        return result
    graph = gm.graph
    packed_names: dict[str, str] = {}  # a weight read by several linears is packed once
    for linear in constant_linears(gm, result.notes):
        node, weight, bias, tensor = linear.node, linear.weight, linear.bias, linear.tensor
        reason = _packable(tensor)
        if reason is not None and tensor.dim() != 2:
            result.notes.append(f"{node.name}: {reason}")
            continue
        if reason is not None:
            result.notes.append(f"{node.name}: {reason}: fxllm::linear, for the lowering to choose")
            with graph.inserting_before(node):
                canonical = graph.call_function(torch.ops.fxllm.linear.default, (node.args[0], weight, bias))
            canonical.meta.update(node.meta)
            node.replace_all_uses_with(canonical)
            graph.erase_node(node)
            result.num_matches += 1
            continue
        name = packed_names.get(str(weight.target))
        if name is None:
            name = f"fxllm_packed_linear_{len(packed_names)}"
            gm.register_parameter(name, torch.nn.Parameter(pack_linear_weight(tensor), requires_grad=False))
            packed_names[str(weight.target)] = name
        with graph.inserting_before(node):
            packed = graph.get_attr(name)
            replacement = graph.call_function(
                torch.ops.fxllm.packed_linear.default, (node.args[0], packed, int(tensor.shape[0]), bias)
            )
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        drop_attr_if_unused(gm, weight)
        result.num_matches += 1
    if result.num_matches:
        recompile(gm)
    return result
