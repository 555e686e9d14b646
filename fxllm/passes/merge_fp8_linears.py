"""merge_fp8_linears: FP8 checkpoint layers that read the same input (q/k/v, gate/up) -> one FP8 GEMM.

merge_linears does this for float linears; an FP8 checkpoint's layers arrive as `fxllm::fp8_linear`
nodes (fxllm/quantization/checkpoint_modules.py), each with its own scales. Members' scales are kept
exactly: channel scales are concatenated, and per-tensor scales become per-channel ([N, 1], each member's
value repeated over its rows) rather than requantizing the weights to the largest scale as vLLM does, so the
merged GEMM computes the same products as the separate ones. Block scales are concatenated when every
member's N is a multiple of 128 (else the group is left unmerged). Static input scales: the merged GEMM
uses the members' largest (the same as vLLM; members of one input usually share the value, since they
were calibrated on the same activations, and then nothing changes). Members whose activation schemes differ
(per token vs per tensor dynamic, or static vs dynamic) stay separate GEMMs, logged: one quantization of
the shared input cannot serve both.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from torch.fx import GraphModule, Node

import fxllm.ops.fp8_linear  # noqa: F401  (defines fxllm::fp8_linear)
from fxllm.passes.graph_utils import (
    arg,
    drop_attr_if_unused,
    fetch_attr,
    is_op,
    recompile,
    split_merged_output,
)
from fxllm.passes.registry import PassContext, PassResult, register_pass
from fxllm.quantization.fp8 import BLOCK, weight_granularity

logger = logging.getLogger(__name__)
aten = torch.ops.aten


def _attr(value: Any) -> bool:
    return isinstance(value, Node) and value.op == "get_attr"


def _operands(node: Node) -> list[Any]:
    return [node.args[1], node.args[2], arg(node, 3, "bias"), arg(node, 4, "input_scale")]


def _per_tensor(node: Node) -> bool:
    """Whether the node quantizes its input with one dynamic per-tensor scale (its `per_tensor` argument)."""
    return bool(arg(node, 5, "per_tensor", False))


def _mergeable(gm: GraphModule, linears: list[Node]) -> str | None:
    """Why these fp8_linears cannot be one GEMM, or None."""
    ops = [_operands(n) for n in linears]
    if any(not _attr(w) or not _attr(s) or (b is not None and not _attr(b)) for w, s, b, _ in ops):
        return "weights or scales are not constants"
    if len({b is None for _, _, b, _ in ops}) != 1 or len({i is None for *_, i in ops}) != 1:
        return "members differ in bias or static input scale"
    if len({_per_tensor(n) for n in linears}) != 1:
        return "members differ in activation scheme (dynamic per token vs per tensor)"
    if any(i is not None and not _attr(i) for *_, i in ops):
        return "an input scale is not a constant"
    weights = [fetch_attr(gm, str(w.target)) for w, *_ in ops]
    kinds = {weight_granularity(t, fetch_attr(gm, str(s.target))) for t, (_, s, *_) in zip(weights, ops)}
    if len({(t.dtype, t.shape[1]) for t in weights}) != 1:
        return "members differ in dtype or K"
    if "block" in kinds and (kinds != {"block"} or any(t.shape[0] % BLOCK for t in weights)):
        return "block scales straddle members (N % 128 != 0) or mix with other granularities"
    return None


def _channel_scale(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A channel or tensor scale as [N, 1] float32 (a tensor scale repeated over the N rows: exact)."""
    return scale.float().reshape(-1, 1).expand(weight.shape[0], 1).contiguous()


def _merge_group(
    gm: GraphModule, source: Node, linears: list[Node], index: int, order: dict[Node, int]
) -> None:
    graph = gm.graph
    ops = [_operands(n) for n in linears]
    weights = [fetch_attr(gm, str(w.target)) for w, *_ in ops]
    scales = [fetch_attr(gm, str(s.target)) for _, s, *_ in ops]
    name = f"fxllm_merged_fp8_linear_{index}"
    tensors: dict[str, torch.Tensor] = {name: torch.cat(weights, 0)}
    if weight_granularity(weights[0], scales[0]) == "block":
        tensors[f"{name}_scale"] = torch.cat(scales, 0)
    else:
        tensors[f"{name}_scale"] = torch.cat([_channel_scale(w, s) for w, s in zip(weights, scales)], 0)
    if ops[0][2] is not None:
        tensors[f"{name}_bias"] = torch.cat([fetch_attr(gm, str(b.target)) for _, _, b, _ in ops], 0)
    if ops[0][3] is not None:
        inputs = [fetch_attr(gm, str(i.target)).float().reshape(1) for *_, i in ops]
        tensors[f"{name}_input_scale"] = torch.stack(inputs).amax(0)
    for attr, tensor in tensors.items():
        gm.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=False))
    first = min(linears, key=order.__getitem__)
    with graph.inserting_before(first):
        w_node, s_node = graph.get_attr(name), graph.get_attr(f"{name}_scale")
        b_node = graph.get_attr(f"{name}_bias") if ops[0][2] is not None else None
        i_node = graph.get_attr(f"{name}_input_scale") if ops[0][3] is not None else None
        merged = graph.call_function(
            torch.ops.fxllm.fp8_linear.default,
            (source, w_node, s_node, b_node, i_node, _per_tensor(first)),
        )
        merged.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
        merged.meta["fxllm_merged_from"] = [str(w.target) for w, *_ in ops]
        split_merged_output(gm, merged, linears, [w.shape[0] for w in weights])
    for operand in {o for op in ops for o in op if o is not None}:
        drop_attr_if_unused(gm, operand)


def _check_static(gm: GraphModule, ctx: PassContext, nodes: list[Node]) -> None:
    """quantization.activation_scheme static_tensor: every FP8 layer must have the checkpoint's input scale."""
    if getattr(ctx.quantization, "activation_scheme", "dynamic_token") != "static_tensor":
        return
    dynamic = [
        str(n.args[1].target) if _attr(n.args[1]) else n.name
        for n in nodes
        if arg(n, 4, "input_scale") is None
    ]
    if dynamic:
        raise ValueError(
            f"quantization.activation_scheme static_tensor: {len(dynamic)} FP8 layer(s) of the checkpoint have no "
            f"input_scale (e.g. {dynamic[:3]}); the checkpoint quantizes their activations dynamically"
        )


@register_pass("merge_fp8_linears", "fuse", _builtin=True)
def merge_fp8_linears(gm: GraphModule, ctx: PassContext) -> PassResult:
    """fxllm::fp8_linear nodes sharing an input -> one fp8_linear over concatenated e4m3 weights + slices."""
    result = PassResult()
    nodes = [n for n in gm.graph.nodes if is_op(n, torch.ops.fxllm.fp8_linear.default)]
    if not nodes:
        return result
    _check_static(gm, ctx, nodes)
    if ctx.parallel is not None and getattr(ctx.parallel, "size", 1) > 1:
        raise ValueError(
            "an FP8 checkpoint with parallel.tensor_parallel_size > 1 is not supported yet: shard_tp splits "
            "aten.linear GEMMs only; serve it on one rank"
        )
    if not ctx.weights_are_attributes:
        result.notes.append("weights are graph inputs (Dynamo graph): merging would concatenate every call")
        return result
    groups: dict[Node, list[Node]] = defaultdict(list)
    for node in nodes:
        groups[node.args[0]].append(node)  # type: ignore[index]
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for source, linears in groups.items():
        if len(linears) < 2:
            continue
        why = _mergeable(gm, linears)
        if why is not None:
            logger.info(
                "merge_fp8_linears: %d FP8 linears reading %s stay separate: %s",
                len(linears),
                source.name,
                why,
            )
            result.notes.append(f"{source.name}: {why}; not merged")
            continue
        _merge_group(gm, source, linears, result.num_matches, order)
        result.num_matches += 1
    if result.num_matches:
        recompile(gm)
    return result
