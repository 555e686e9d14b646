"""quantize_fp8: with `quantization.method: fp8`, every constant-weight GEMM -> `fxllm::fp8_linear`.

Runs in stage "quantize", after merge_linears, so a merged q/k/v or gate/up GEMM becomes one FP8 GEMM
with one activation quantization. The weight is quantized here (granularity from the config) into an
e4m3 tensor and a float32 scale registered on the graph, and the full-precision weight is dropped from
the graph unless something else reads it (a tied embedding). Linears matching `quantization.exclude`
(default: the LM head) stay in the model's dtype. Which kernel each fp8_linear runs is the lowering's
choice (`fxllm compile ... --explain`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.fx import GraphModule, Node

import fxllm.ops.fp8_linear  # noqa: F401  (defines fxllm::fp8_linear)
from fxllm.passes.graph_utils import arg, drop_attr_if_unused, fetch_attr, is_op
from fxllm.passes.registry import PassContext, PassResult, register_pass
from fxllm.quantization.fp8 import quantize_weight

logger = logging.getLogger(__name__)
aten = torch.ops.aten
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def module_path(node: Node) -> str:
    """The innermost module a node was traced in (`model.layers.0.mlp.down_proj`), or ""."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = list(stack.values())
    return str(entries[-1][0]) if entries else ""


def excluded_by(names: list[str], patterns: list[str]) -> str | None:
    """The first pattern that names a dotted component run of any of `names` (`lm_head`, `mlp.down_proj`)."""
    for pattern in patterns:
        for name in names:
            if name and f".{pattern.strip('.')}." in f".{name}.":
                return pattern
    return None


def _constant(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


@register_pass("quantize_fp8", "quantize", _builtin=True)
def quantize_fp8(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Constant-weight linears -> fxllm::fp8_linear over e4m3 weights (quantization.method fp8)."""
    result = PassResult()
    config = ctx.quantization
    if config is None or getattr(config, "method", "none") == "none":
        result.notes.append("quantization.method is none")
        return result
    if not ctx.weights_are_attributes:
        result.notes.append("weights are graph inputs (Dynamo graph): they would be quantized every call")
        return result
    if ctx.parallel is not None and getattr(ctx.parallel, "size", 1) > 1:
        raise ValueError("quantization.method fp8 with parallel.tensor_parallel_size > 1 is not supported yet: "
                         "shard_tp finds row-parallel GEMMs as aten.linear; run FP8 on one rank")  # fmt: skip
    if config.activation_scheme != "dynamic_token":
        raise ValueError(
            "quantization.activation_scheme static_tensor needs calibrated input scales, which only an FP8 "
            "checkpoint provides; use dynamic_token to quantize a float model"
        )
    graph = gm.graph
    done: dict[str, tuple[str, str]] = {}  # weight attr -> (fp8 weight attr, scale attr): quantized once
    skipped: dict[str, int] = {}
    for node in list(graph.nodes):
        if not is_op(node, aten.linear.default):
            continue
        weight, bias = node.args[1], arg(node, 2, "bias")
        if not _constant(weight) or (bias is not None and not _constant(bias)):
            result.notes.append(f"{node.name}: weight or bias is not a constant")
            continue
        assert isinstance(weight, Node)
        target = str(weight.target)
        names = [target, module_path(node), *node.meta.get("fxllm_merged_from", [])]  # merged: every member's
        pattern = excluded_by(names, list(config.exclude))
        if pattern is not None:
            skipped[pattern] = skipped.get(pattern, 0) + 1
            continue
        tensor = fetch_attr(gm, target)
        if tensor.dim() != 2 or tensor.dtype not in _FLOAT_DTYPES:
            result.notes.append(
                f"{node.name}: {tensor.dtype} weight of shape {tuple(tensor.shape)}; not quantized"
            )
            continue
        attrs = done.get(target)
        if attrs is None:
            index = len(done)
            attrs = (f"fxllm_fp8_weight_{index}", f"fxllm_fp8_weight_scale_{index}")
            qweight, scale = quantize_weight(tensor, config.weight_granularity)
            gm.register_parameter(attrs[0], torch.nn.Parameter(qweight, requires_grad=False))
            gm.register_parameter(attrs[1], torch.nn.Parameter(scale, requires_grad=False))
            done[target] = attrs
        with graph.inserting_before(node):
            w_node, s_node = graph.get_attr(attrs[0]), graph.get_attr(attrs[1])
            replacement = graph.call_function(
                torch.ops.fxllm.fp8_linear.default, (node.args[0], w_node, s_node, bias)
            )
        # Without "val": refresh_meta then gives the new weight/scale get_attr nodes their fake values too.
        replacement.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        drop_attr_if_unused(gm, weight)  # the full-precision copy goes unless a tied embedding reads it
        result.num_matches += 1
    result.notes.append(f"{config.weight_granularity} weight scales, per-token activation scales")
    result.notes += [
        f"{count} linear(s) kept in {ctx.dtype} by exclude {p!r}" for p, count in skipped.items()
    ]
    if result.num_matches:
        gm.recompile()
    return result
