"""quantize_fp8: with `quantization.method: fp8`, every constant-weight GEMM -> an FP8 linear, emitted as
the activation quantization in ATen followed by the GEMM-only `fxllm::fp8_gemm`.

Runs in stage "quantize", after merge_linears, so a merged q/k/v or gate/up GEMM becomes one FP8 GEMM
with one activation quantization. The weight is quantized here (granularity from the config) into an
e4m3 tensor and a float32 scale registered on the graph, and the full-precision weight is dropped from
the graph unless something else reads it (a tied embedding). Linears matching `quantization.exclude`
(default: the LM head) stay in the model's dtype.

The activation quantization is `quantize_activation` (fxllm/quantization/fp8.py; `quantize_activation_tensor`
with `activation_scheme: dynamic_tensor`) traced into ATen ops (abs, amax per token, / 448, clamp, cast to
e4m3) in front of the GEMM, not hidden inside an opaque op:
Inductor fuses it into the kernel that produces the activation (on the H100 the opaque op's eager
quantization kernels cost more than the FP8 GEMM saved, benchmarks/RESULTS.md "FP8 GEMMs"). Nodes of
the whole-layer op `fxllm::fp8_linear` that something else put in the graph are split the same way.
Which kernel each fp8_gemm runs is the lowering's choice (`fxllm compile ... --explain`).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

import fxllm.ops.fp8_linear  # noqa: F401  (defines fxllm::fp8_linear and fxllm::fp8_gemm)
from fxllm.passes.graph_utils import arg, drop_attr_if_unused, fake_mode_of, fetch_attr, is_op, recompile, val
from fxllm.passes.lower_ops import inline_call
from fxllm.passes.registry import PassContext, PassResult, register_pass
from fxllm.quantization.fp8 import quantize_activation, quantize_activation_tensor, quantize_weight

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


QUANT_META = "fxllm_fp8_activation_quant"  # on the e4m3 activation node: the name of the fp8_gemm it feeds
# On the same node: the name of the activation it quantizes (fuse_fp8_quant finds the producer through it)
# and the scheme: dynamic_token, dynamic_tensor or static_tensor.
QUANT_INPUT_META = "fxllm_fp8_activation_quant_input"
QUANT_SCHEME_META = "fxllm_fp8_activation_scheme"
# On an fp8_gemm node quantized from an aten.linear: the name of the weight it replaced (the e4m3 copy gets a
# name of its own), so shard_tp still finds the row-parallel GEMMs of a tensor-parallel rank.
WEIGHT_NAME_META = "fxllm_fp8_source_weight"


def emit_fp8_linear(
    gm: GraphModule,
    before: Node,
    x: Node,
    weight: Node,
    weight_scale: Node,
    bias: Node | None,
    input_scale: Node | None = None,
    traced: dict[tuple[Any, ...], GraphModule] | None = None,
    per_tensor: bool = False,
) -> Node:
    """Insert, before `before`, x's quantization as ATen ops (per token, per tensor when `per_tensor`, or with
    the static `input_scale`) and `fxllm::fp8_gemm` over it; returns the fp8_gemm node (output in x's dtype).
    `x` needs its fake value."""
    graph = gm.graph
    x_value = val(x)
    if not isinstance(x_value, torch.Tensor):
        raise RuntimeError(f"emit_fp8_linear: {x.name} has no fake value (run refresh_meta)")
    args: list[Any] = [x] if input_scale is None else [x, input_scale]
    quantize = quantize_activation_tensor if per_tensor and input_scale is None else quantize_activation
    scheme = (
        "static_tensor" if input_scale is not None else "dynamic_tensor" if per_tensor else "dynamic_token"
    )
    if input_scale is not None and "val" not in input_scale.meta and input_scale.op == "get_attr":
        mode = fake_mode_of(gm)
        if mode is not None:  # a scale attribute another pass added: the trace needs its fake value
            input_scale.meta["val"] = mode.from_tensor(
                fetch_attr(gm, str(input_scale.target)), static_shapes=True
            )
    with graph.inserting_before(before):
        call = graph.call_function(quantize, tuple(args))
        xq, xs = (graph.call_function(operator.getitem, (call, i)) for i in (0, 1))
        gemm = graph.call_function(
            torch.ops.fxllm.fp8_gemm.default, (xq, xs, weight, weight_scale, bias, x_value.dtype)
        )
    inline_call(gm, call, quantize, args, traced)  # the getitems become the traced outputs
    q_node = gemm.args[0]
    assert isinstance(q_node, Node)
    q_node.meta[QUANT_META] = gemm.name
    q_node.meta[QUANT_INPUT_META] = x.name
    q_node.meta[QUANT_SCHEME_META] = scheme
    return gemm


def split_fp8_linear(
    gm: GraphModule,
    node: Node,
    traced: dict[tuple[Any, ...], GraphModule] | None = None,
    per_tensor: bool = False,
) -> Node:
    """Replace an `fxllm::fp8_linear` node by its ATen quantization + `fxllm::fp8_gemm` (a node without a
    static input scale quantizes per token, or per tensor when `per_tensor` or the node's own argument says so)."""
    x, weight, weight_scale = node.args[0], node.args[1], node.args[2]
    bias, input_scale = arg(node, 3, "bias"), arg(node, 4, "input_scale")
    per_tensor = per_tensor or bool(arg(node, 5, "per_tensor", False))  # a checkpoint layer's own scheme
    gemm = emit_fp8_linear(gm, node, x, weight, weight_scale, bias, input_scale, traced, per_tensor)  # type: ignore[arg-type]
    gemm.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    node.replace_all_uses_with(gemm)
    gm.graph.erase_node(node)
    return gemm


@register_pass("quantize_fp8", "quantize", _builtin=True)
def quantize_fp8(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Constant-weight linears -> aten activation quantization + fxllm::fp8_gemm over e4m3 weights."""
    result = PassResult()
    traced: dict[tuple[Any, ...], GraphModule] = {}  # one trace of the quantization per input shape/dtype
    quant_nodes: list[str] = []
    config = ctx.quantization
    per_tensor = getattr(config, "activation_scheme", "dynamic_token") == "dynamic_tensor"
    # Whole-layer fp8_linear nodes that something else put in the graph (e.g. a checkpoint loader).
    own_per_tensor = 0
    for node in list(gm.graph.nodes):
        if is_op(node, torch.ops.fxllm.fp8_linear.default):
            own_per_tensor += bool(arg(node, 5, "per_tensor", False)) and arg(node, 4, "input_scale") is None
            quant_nodes.append(str(split_fp8_linear(gm, node, traced, per_tensor).args[0]))
            result.num_matches += 1
    if own_per_tensor:
        result.notes.append(
            f"{own_per_tensor} fxllm::fp8_linear node(s) quantize per tensor (their own scheme)"
        )
    if config is None or getattr(config, "method", "none") == "none":
        result.notes.append("quantization.method is none")
        if quant_nodes:
            result.notes.append(
                f"{len(quant_nodes)} fxllm::fp8_linear node(s) split into aten quantization + fp8_gemm"
            )
            recompile(gm)
        return result
    if not ctx.weights_are_attributes:
        result.notes.append("weights are graph inputs (Dynamo graph): they would be quantized every call")
        return result
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
        if config.activation_scheme == "static_tensor":  # an FP8 checkpoint's own layers have theirs
            raise ValueError(
                f"quantization.activation_scheme static_tensor needs calibrated input scales, which only an FP8 "
                f"checkpoint provides: float linear {target!r} has none; exclude it or use dynamic_token"
            )
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
        replacement = emit_fp8_linear(gm, node, node.args[0], w_node, s_node, bias, None, traced, per_tensor)  # type: ignore[arg-type]
        # Without "val": refresh_meta fills it after the pass.
        replacement.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        replacement.meta[WEIGHT_NAME_META] = target
        quant_nodes.append(str(replacement.args[0]))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        drop_attr_if_unused(gm, weight)  # the full-precision copy goes unless a tied embedding reads it
        result.num_matches += 1
    result.notes.append(
        f"{config.weight_granularity} weight scales, per-{'tensor' if per_tensor else 'token'} activation scales"
    )
    if quant_nodes:
        shown = ", ".join(quant_nodes[:4]) + (", ..." if len(quant_nodes) > 4 else "")
        result.notes.append(
            f"{len(quant_nodes)} activation quantization(s) in aten (amax per {'tensor' if per_tensor else 'token'} "
            f"/ 448, clamp, e4m3) "
            f"before fxllm::fp8_gemm, for Inductor to fuse into the producer: {shown}"
        )
    result.notes += [
        f"{count} linear(s) kept in {ctx.dtype} by exclude {p!r}" for p, count in skipped.items()
    ]
    if result.num_matches:
        recompile(gm)
    return result
