"""fuse_fp8_quant: the per-token FP8 activation quantization moves into the kernel that produces the
activation, where that kernel is fxllm's own (`quantization.fuse_activation_quant: on`).

quantize_fp8 emits, in front of every `fxllm::fp8_gemm`, the activation quantization as ATen ops
(quantize_activation traced) and marks its e4m3 node with the activation it reads (QUANT_INPUT_META).
Where that activation is the normed output of `fxllm::fused_add_rms_norm` or the output of
`fxllm::rms_norm`, `fxllm::silu_and_mul` or `fxllm::gelu_and_mul`, and nothing else reads it unquantized,
this pass rewrites
    producer -> ATen quantization -> fp8_gemm   into   producer_fp8 -> fp8_gemm
(`fxllm::fused_add_rms_norm_fp8`, `rms_norm_fp8`, `silu_and_mul_fp8`, `gelu_and_mul_fp8`,
fxllm/ops/fp8_fused.py), so the e4m3 row and
its scale are written by the producer and the unquantized activation is never stored. Several GEMMs
quantizing the same activation (unmerged q/k/v) share the one fused output. Left in ATen, for Inductor
to fuse: quantizations of activations made by plain ATen ops or by other fxllm ops (the attention
output before o_proj), static input scales (an FP8 checkpoint's) and
per-tensor dynamic scales (activation_scheme dynamic_tensor: one amax over every row, not one kernel's).

Stage "quantize", after quantize_fp8 (which runs after fuse_add_rms_norm and merge_fp8_linears, stage
"fuse"). `auto` is off: the fused Triton kernels have not been measured against Inductor's kernel on a
GPU yet (benchmarks/gpu_fp8.py --sections fused_quant); on the CPU the fused ops lower to their references,
which are the same ATen ops as the unfused path.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter, defaultdict

import torch
from torch.fx import GraphModule, Node

import fxllm.ops.fp8_fused  # noqa: F401  (defines the fused ops)
from fxllm.passes.graph_utils import is_op, recompile, val
from fxllm.passes.quantize_fp8 import QUANT_INPUT_META, QUANT_SCHEME_META
from fxllm.passes.registry import PassContext, PassResult, register_pass

logger = logging.getLogger(__name__)

_MAX_QUANT_NODES = 32  # quantize_activation traces to ~10 ATen nodes; a larger closure is not one
# What `auto` means per device type. CUDA: fused, measured faster on one H200 (Llama-3.1-8B preset, FP8 weights and
# KV, 1,000 x 128/128: 19,748 vs 18,540 output tok/s in one run, Inductor's quantization kernels 297 -> 62 ms;
# benchmarks/RESULTS.md, twelfth session). CPU: not measured, so Inductor keeps the quantization.
AUTO = {"cuda": "on"}


def _quant_closure(x: Node, outputs: list[Node]) -> set[Node] | None:
    """The nodes computing `outputs` from `x` alone (x excluded), or None when they read anything else."""
    closure: set[Node] = set()
    todo = list(outputs)
    while todo:
        node = todo.pop()
        if node is x or node in closure:
            continue
        if node.op != "call_function" or len(closure) >= _MAX_QUANT_NODES:
            return None  # a placeholder or constant (a static input scale), or not a small quantization
        closure.add(node)
        todo += node.all_input_nodes
    return closure


_FUSED = {
    "norm": torch.ops.fxllm.fused_add_rms_norm_fp8,
    "rms": torch.ops.fxllm.rms_norm_fp8,
    "silu": torch.ops.fxllm.silu_and_mul_fp8,
    "gelu": torch.ops.fxllm.gelu_and_mul_fp8,
}
_WHAT = {
    "norm": "add + RMSNorm -> e4m3",
    "rms": "RMSNorm -> e4m3",
    "silu": "SiLU-and-mul -> e4m3",
    "gelu": "GeLU-and-mul -> e4m3",
}


def _producer(x: Node) -> tuple[str, Node] | None:
    """("norm", the fused_add_rms_norm node) when x is its normed output, ("rms", x) for rms_norm, ("silu",
    x) for silu_and_mul, ("gelu", x) for gelu_and_mul."""
    if is_op(x, torch.ops.fxllm.silu_and_mul.default):
        return "silu", x
    if is_op(x, torch.ops.fxllm.gelu_and_mul.default):
        return "gelu", x
    if is_op(x, torch.ops.fxllm.rms_norm.default):
        return "rms", x
    if x.target is operator.getitem and x.args[1] == 0:
        fused = x.args[0]
        if isinstance(fused, Node) and is_op(fused, torch.ops.fxllm.fused_add_rms_norm.default):
            return "norm", fused
    return None


_LAYOUT_OPS = {"view", "_unsafe_view", "reshape", "transpose", "permute", "contiguous", "clone", "squeeze",
               "unsqueeze", "flatten"}  # fmt: skip


def _name(node: Node) -> str:
    target = (
        node.args[0].target
        if node.target is operator.getitem and isinstance(node.args[0], Node)
        else node.target
    )
    return getattr(target, "__name__", str(target)) if node.op == "call_function" else node.op


def _describe(x: Node) -> str:
    """What made x, seen through layout ops: "attention.default (via reshape)" for an attention output."""
    node, steps = x, 0
    while node.op == "call_function" and _name(node).split(".")[0] in _LAYOUT_OPS and steps < 8:
        if not node.args or not isinstance(node.args[0], Node):
            break
        node, steps = node.args[0], steps + 1
    return _name(x) if node is x else f"{_name(node)} (via {_name(x).split('.')[0]})"


def _replace_producer(gm: GraphModule, kind: str, producer: Node) -> tuple[Node, Node]:
    """Insert the fused op in place of `producer`; returns its (e4m3, scale) getitems."""
    graph = gm.graph
    target = _FUSED[kind].default
    with graph.inserting_before(producer):
        fused = graph.call_function(target, producer.args, producer.kwargs)
        outs = [graph.call_function(operator.getitem, (fused, i)) for i in range(3 if kind == "norm" else 2)]
    for node in (fused, *outs):
        node.meta["nn_module_stack"] = producer.meta.get("nn_module_stack", {})
    if kind == "norm":  # the residual sum keeps its users
        for user in list(producer.users):
            if user.args[1] == 1:
                user.replace_all_uses_with(outs[2])
    return outs[0], outs[1]


def _erase(gm: GraphModule, nodes: set[Node]) -> None:
    """Erase `nodes` (all dead once their users are), last first."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in sorted(nodes, key=order.__getitem__, reverse=True):
        gm.graph.erase_node(node)


@register_pass("fuse_fp8_quant", "quantize", _builtin=True)
def fuse_fp8_quant(gm: GraphModule, ctx: PassContext) -> PassResult:
    """norm/silu -> ATen e4m3 quantization -> fp8_gemm  ==>  fused norm/silu + e4m3 kernel -> fp8_gemm."""
    result = PassResult()
    setting = getattr(ctx.quantization, "fuse_activation_quant", "auto")
    effective = AUTO.get(ctx.device.type, "off") if setting == "auto" else setting
    graph = gm.graph
    by_name = {node.name: node for node in graph.nodes}
    groups: dict[Node, list[tuple[Node, Node]]] = defaultdict(list)  # activation -> [(e4m3, scale)]
    left: Counter[str] = Counter()
    for gemm in graph.find_nodes(op="call_function", target=torch.ops.fxllm.fp8_gemm.default):
        q, s = gemm.args[0], gemm.args[1]
        if not (isinstance(q, Node) and isinstance(s, Node) and q.meta.get(QUANT_INPUT_META) in by_name):
            continue
        scheme = q.meta.get(QUANT_SCHEME_META, "dynamic_token")
        if scheme != "dynamic_token":  # the fused kernels make per-token scales only
            left[f"{scheme} activation scale"] += 1
            continue
        groups[by_name[q.meta[QUANT_INPUT_META]]].append((q, s))
    if not groups and not left:
        return result
    if effective == "off":
        result.notes.append(
            f"quantization.fuse_activation_quant={setting}"
            + (f" (auto = off on {ctx.device.type})" if setting == "auto" else "")
            + f": {sum(map(len, groups.values())) + sum(left.values())} activation quantization(s) stay in ATen"
        )
        return result
    fused: Counter[str] = Counter()
    for x, members in groups.items():
        found = _producer(x)
        if found is None:
            left[f"after {_describe(x)}"] += len(members)
            continue
        outputs = [n for pair in members for n in pair]
        closure = _quant_closure(x, outputs)
        if closure is None:
            left["static input scale or not quantize_activation's ops"] += len(members)
            continue
        kind, producer = found
        inner = closure - set(outputs)
        others = [u for u in producer.users if u is not x and u.args[1] != 1] if kind == "norm" else []
        if (
            others
            or any(u not in closure for u in x.users)
            or any(u not in closure for n in inner for u in n.users)
        ):
            left[f"{kind}: the activation is also read unquantized"] += len(members)
            continue
        new_q, new_s = _replace_producer(gm, kind, producer)
        new_q.meta["val"], new_s.meta["val"] = val(members[0][0]), val(members[0][1])
        for q, s in members:
            q.replace_all_uses_with(new_q)
            s.replace_all_uses_with(new_s)
        _erase(gm, closure)
        _erase(gm, set(producer.users) | {producer} if kind == "norm" else {producer})
        fused[kind] += 1
        result.num_matches += 1
    result.notes += [f"{count} {_WHAT[kind]} fused (fxllm::{_FUSED[kind]._qualified_op_name.split('::')[1]})"
                     for kind, count in fused.items()]  # fmt: skip
    result.notes += [f"{count} quantization(s) left in ATen ({why})" for why, count in left.items()]
    if left:
        logger.info("fuse_fp8_quant: %d fused, %d quantization(s) left in ATen: %s", result.num_matches,
                    sum(left.values()), dict(left))  # fmt: skip
    if result.num_matches:
        recompile(gm)
    return result
