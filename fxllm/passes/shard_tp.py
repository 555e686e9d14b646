"""shard_tp: tensor parallelism on the captured graph; fuse_allreduce_rms_norm: its all-reduce + norm.

The weights arrive already split (fxllm/runtime/distributed/sharding.py shards them while loading,
so each rank holds only its part and the graph is captured with the rank's head counts). What the
graph still lacks is the sum of the row-parallel linears' partial products: `shard_tp` inserts a
canonical `fxllm::all_reduce` after each of them (the linears the plan names rowwise: o_proj and
down_proj; as aten.linear, or as the fxllm::fp8_gemm quantize_fp8 made of one: each rank quantizes its own
shard, per-token activation scales over its part of the row, and the all-reduce sums dequantized partials), an `fxllm::all_gather` of the logits after a vocabulary-parallel LM head, a masked lookup +
`fxllm::all_reduce` for a vocabulary-parallel input embedding, and checks that every one was found. `fuse_allreduce_rms_norm` then turns
all_reduce -> fused_add_rms_norm into one `fxllm::all_reduce_add_rms_norm` (off unless
parallel.fuse_allreduce_rms_norm). Which all-reduce algorithm runs is the lowering's choice
(fxllm/backends/cuda_collectives.py), so these patterns match the abstract op only.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch.fx import Graph, GraphModule, Node

import fxllm.ops.collectives  # defines fxllm::all_reduce and fxllm::all_gather
import fxllm.ops.fp8_gemm  # noqa: F401  (defines fxllm::fp8_gemm)
from fxllm.passes.graph_utils import is_op, recompile, val
from fxllm.passes.quantize_fp8 import WEIGHT_NAME_META
from fxllm.passes.registry import PassContext, PassResult, register_pass

aten = torch.ops.aten


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _weight_name(node: Node) -> str | None:
    """The weight a GEMM node multiplies by: an aten.linear's get_attr, or the weight an FP8 GEMM was
    quantized from (quantize_fp8 runs before this pass and renames the e4m3 copy)."""
    if is_op(node, torch.ops.fxllm.fp8_gemm.default):
        return node.meta.get(WEIGHT_NAME_META)
    if not is_op(node, aten.linear.default) or len(node.args) < 2:
        return None
    weight = node.args[1]
    if not isinstance(weight, Node) or weight.op != "get_attr":
        return None
    return str(weight.target)


def _row_parallel_site(node: Node, wanted: dict[str, str]) -> str | None:
    """The fqn of the `wanted` weight (flat name -> fqn) that `node` (a GEMM) multiplies by, if any."""
    name = _weight_name(node)
    if name is None:
        return None
    target = _flat(name)
    return next((fqn for flat, fqn in wanted.items() if target == flat or target.endswith(f"_{flat}")), None)


def _embedding_site(node: Node, wanted: dict[str, str]) -> str | None:
    """The fqn of the `wanted` embedding weight that `node` (an aten.embedding) looks up in, if any."""
    if not is_op(node, aten.embedding.default) or not isinstance(node.args[0], Node):
        return None
    weight = node.args[0]
    if weight.op != "get_attr":
        return None
    target = _flat(str(weight.target))
    return next((fqn for flat, fqn in wanted.items() if target == flat or target.endswith(f"_{flat}")), None)


def _split_lookup(graph: Graph, node: Node, rank: int, group_name: str) -> None:
    """embedding(table part, ids) -> the rows of the ids in this rank's range, zeros for the others, summed
    over the ranks (each id lives on exactly one rank, so the all-reduce adds zeros to it: exact)."""
    weight, ids = node.args[0], node.args[1]
    rows = int(val(weight).shape[0])
    start = rank * rows
    with graph.inserting_before(node):
        local = graph.call_function(aten.sub.Scalar, (ids, start))
        below = graph.call_function(aten.lt.Scalar, (local, 0))
        above = graph.call_function(aten.ge.Scalar, (local, rows))
        outside = graph.call_function(aten.bitwise_or.Tensor, (below, above))
        safe = graph.call_function(aten.masked_fill.Scalar, (local, outside, 0))
    node.replace_input_with(ids, safe)
    with graph.inserting_after(node):
        mask = graph.call_function(aten.unsqueeze.default, (outside, -1))
    with graph.inserting_after(mask):
        zeroed = graph.call_function(aten.masked_fill.Scalar, (node, mask, 0.0))
    node.replace_all_uses_with(zeroed, delete_user_cb=lambda user: user is not zeroed)
    _insert_after(graph, zeroed, torch.ops.fxllm.all_reduce.default, (group_name,))


def _insert_after(graph: Graph, node: Node, op: object, args: tuple[object, ...]) -> None:
    """Put `op(node, *args)` right after `node` and make every other user of `node` read it instead."""
    with graph.inserting_after(node):
        inserted = graph.call_function(op, (node, *args))  # type: ignore[arg-type]
    inserted.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    node.replace_all_uses_with(inserted, delete_user_cb=functools.partial(operator.is_not, inserted))


@register_pass("shard_tp", "shard", _builtin=True)
def shard_tp(gm: GraphModule, ctx: PassContext) -> PassResult:
    """An fxllm::all_reduce after each row-parallel linear of a tensor-parallel rank's graph, an
    fxllm::all_gather after a vocabulary-parallel LM head."""
    result = PassResult()
    info = getattr(ctx, "parallel", None)
    if info is None or info.size == 1:
        return result
    graph = gm.graph
    wanted = {_flat(name): name for name in info.row_parallel_weights}
    heads = {_flat(name): name for name in info.vocab_parallel_weights}
    tables = {_flat(name): name for name in info.vocab_parallel_embedding_weights}
    found: set[str] = set()
    gathered: set[str] = set()
    looked_up: set[str] = set()
    for node in list(graph.nodes):
        if (fqn := _embedding_site(node, tables)) is not None:  # each id's row lives on one rank
            _split_lookup(graph, node, info.rank, info.group_name)
            looked_up.add(fqn)
            result.num_matches += 1
            continue
        if (fqn := _row_parallel_site(node, wanted)) is not None:  # the sum of the partial products
            _insert_after(graph, node, torch.ops.fxllm.all_reduce.default, (info.group_name,))
            found.add(fqn)
        elif (fqn := _row_parallel_site(node, heads)) is not None:  # the ranks' logits side by side
            _insert_after(graph, node, torch.ops.fxllm.all_gather.default, (info.group_name, info.size))
            gathered.add(fqn)
        else:
            continue
        result.num_matches += 1
    missing = (
        sorted(set(wanted.values()) - found)
        + sorted(set(heads.values()) - gathered)
        + sorted(set(tables.values()) - looked_up)
    )
    if missing:
        raise RuntimeError(
            f"shard_tp: the split weights {missing[:4]} are not the weight of any linear (or embedding lookup) in "
            "the graph, so their partial results would never be combined; is a pass before `shard` rewriting them?"
        )
    columns = sum(1 for style in info.plan.values() if style == "colwise")
    head = ", vocab-parallel LM head + fxllm::all_gather of its logits" if gathered else ""
    head += ", vocab-parallel embedding (masked lookup + fxllm::all_reduce)" if looked_up else ""
    result.notes.append(
        f"rank {info.rank} of {info.size} ({info.source}): {columns} column-parallel and {len(found)} "
        f"row-parallel linears, {len(found)} fxllm::all_reduce over group {info.group_name!r}{head}"
    )
    if result.num_matches:
        recompile(gm)
    return result


@register_pass("fuse_allreduce_rms_norm", "fuse_collectives", _builtin=True)
def fuse_allreduce_rms_norm(gm: GraphModule, ctx: PassContext) -> PassResult:
    """all_reduce(x) -> fused_add_rms_norm  ==>  all_reduce_add_rms_norm (parallel.fuse_allreduce_rms_norm)."""
    result = PassResult()
    info = getattr(ctx, "parallel", None)
    if info is None or info.size == 1:
        return result
    if not info.fuse_allreduce_rms_norm:
        result.notes.append("off (parallel.fuse_allreduce_rms_norm: false)")
        return result
    graph = gm.graph
    for norm in list(graph.nodes):
        if not is_op(norm, torch.ops.fxllm.fused_add_rms_norm.default):
            continue
        x, residual, weight, eps = norm.args
        reduced = next(
            (a for a in (x, residual) if is_op(a, torch.ops.fxllm.all_reduce.default) and len(a.users) == 1),
            None,
        )
        if reduced is None:
            continue
        other = residual if reduced is x else x
        vr, vo = val(reduced), val(other)
        if not (isinstance(vr, torch.Tensor) and isinstance(vo, torch.Tensor)) or vr.shape != vo.shape:
            continue
        partial, group_name = reduced.args
        with graph.inserting_before(norm):
            fused = graph.call_function(
                torch.ops.fxllm.all_reduce_add_rms_norm.default, (partial, other, weight, eps, group_name)
            )
        fused.meta["nn_module_stack"] = norm.meta.get("nn_module_stack", {})
        fused.meta["val"] = norm.meta.get("val")
        for user in list(norm.users):
            if user.target is operator.getitem:
                user.args = (fused, user.args[1])
        norm.replace_all_uses_with(fused)
        graph.erase_node(norm)
        graph.erase_node(reduced)
        result.num_matches += 1
    if result.num_matches:
        recompile(gm)
    return result
