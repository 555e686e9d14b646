"""fuse_rope_attention: the RoPE feeding a cached attention's q and k -> one fxllm::paged_attention_rope.

After match_rope and insert_cached_attention a layer reads

    rot = fxllm::rotary_embedding(a, b, cos, sin)              # [B, H, T, D], cos [B, 1, T, D]
    q = squeeze(transpose(rot[i], 1, 2), 0)                    # [T, Hq, D], likewise k from rot[j]
    out = fxllm::paged_attention(q, k, v, caches..., scale, ...)

and becomes `fxllm::paged_attention_rope(q_pre, k_pre, v, caches..., cos [T, D], sin [T, D], scale, ...)`,
where q_pre / k_pre are the same views of the unrotated a / b. The Triton kernels then rotate q as they
load it and k as they write it to the cache: one launch per layer and step fewer, and q/k no longer make a
round trip through memory (issue 14). match_rope may bind q and k in either order (the pattern is
symmetric), so which output feeds q is read off the graph.

It fuses only where the fused op has a kernel for the graph's device (the Triton backend on CUDA): on the
CPU the reference would replace the C++ attention kernel, so the pass leaves the graph alone and says so.
Option `force: true` fuses anyway (tests use it to run the reference path on the CPU). A cat with empty
pass-through slices (Hugging Face's partial-rotary code rotating the whole head, e.g. Phi-3) is looked
through. Rotary outputs used elsewhere, partial rotary (a non-empty pass-through), cos/sin that vary over
heads and mixed dtypes are left unfused, each counted in a note. Disable with `compile.passes.fuse_rope_attention=false`.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxllm.backends.registry import REFERENCE, OpSite, choose_implementation, import_device_backends
from fxllm.passes.graph_utils import is_op, recompile, val
from fxllm.passes.registry import PassContext, PassResult, register_pass

logger = logging.getLogger(__name__)
aten = torch.ops.aten

OPTIONS = ("force",)


def _single_user(node: Node) -> bool:
    return len(node.users) == 1


def _empty_last_dim(node: Any) -> bool:
    value = val(node)
    return isinstance(value, torch.Tensor) and value.dim() > 0 and _same(value.shape[-1], 0)


def _rotary_source(node: Any) -> tuple[Node, int, list[Node]] | str:
    """(rotary node, output index, nodes to erase) for squeeze(transpose(rot[i], 1, 2), 0), else why not.

    A cat of rot[i] with empty pass-through slices (Hugging Face's partial-rotary code when the whole head
    is rotated, e.g. Phi-3) counts as rot[i]; a non-empty pass-through is partial rotary, not fused."""
    if not (is_op(node, aten.squeeze.dim) and tuple(node.args[1:]) == (0,) and _single_user(node)):
        return "q/k not squeeze(., 0) of a view"
    transposed = node.args[0]
    if not (is_op(transposed, aten.transpose.int) and _single_user(transposed)):
        return "q/k not a transpose of the rotary output"
    if sorted(d % 4 for d in transposed.args[1:]) != [1, 2]:
        return "q/k transposed other than (1, 2)"
    item = transposed.args[0]
    erase = [node, transposed]
    if is_op(item, aten.cat.default) and _single_user(item):
        parts, dim = item.args[0], item.args[1] if len(item.args) > 1 else 0
        if dim not in (-1, 3) or not parts or not all(_empty_last_dim(p) for p in parts[1:]):
            return "partial rotary (a non-empty pass-through slice)"
        erase.append(item)
        item = parts[0]
    if not (isinstance(item, Node) and item.target is operator.getitem and _single_user(item)):
        return "q/k not (only) an output of fxllm::rotary_embedding"
    rot = item.args[0]
    if not is_op(rot, torch.ops.fxllm.rotary_embedding.default):
        return "q/k not rotated by fxllm::rotary_embedding"
    return rot, int(item.args[1]), [*erase, item]


def _same(a: Any, b: Any) -> bool:
    """Equal sizes, symbolic ones by name (a size test never adds a guard)."""
    return str(a) == str(b)


def _tables_fit(q: Any, k: Any, cos: Any, sin: Any) -> str | None:
    """Why cos/sin cannot become [T, D] rows for q/k [B, H, T, D] (None when they can)."""
    tensors = (q, k, cos, sin)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "no shapes recorded"
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2:
        return "q/k not [B, H, T, D] with even D"
    if len({t.dtype for t in tensors}) != 1:
        return "q, k, cos and sin of different dtypes"
    if cos.shape != sin.shape or not 2 <= cos.dim() <= 4:
        return "cos/sin shapes differ or are not 2-4-D"
    if not (_same(cos.shape[-1], q.shape[-1]) and _same(cos.shape[-2], q.shape[-2])):
        return "cos/sin not [..., T, D] of q"
    lead = list(cos.shape[:-2])
    if len(lead) == 2 and _same(lead[0], q.shape[0]):
        lead = lead[1:]  # the batch dim, 1 at run time (the runtime's batch is flat)
    if not all(_same(s, 1) for s in lead):
        return "cos/sin vary over heads"
    return None


def _fused_kernel_exists(ctx: PassContext, attn: Node) -> bool:
    """Whether the lowering would give fxllm::paged_attention_rope a kernel (not the reference) here."""
    import_device_backends(ctx.device)
    values = [val(a) if isinstance(a, Node) else a for a in attn.args]
    values = (*values[:9], None, None, *values[9:])  # cos/sin: not known before the rewrite
    choice = choose_implementation(OpSite("paged_attention_rope", ctx.device, values),
                                   ctx.op_backends.get("paged_attention_rope"))  # fmt: skip
    return choice.backend != REFERENCE


def _fuse_one(gm: GraphModule, attn: Node) -> str | None:
    """Fold the rotary node feeding `attn` into it; the reason when it cannot."""
    graph = gm.graph
    sources = [_rotary_source(a) for a in attn.args[:2]]
    for source in sources:
        if isinstance(source, str):
            return source
    (rot, qi, q_views), (rot_k, ki, k_views) = sources  # type: ignore[misc]
    if rot is not rot_k or qi == ki:
        return "q and k rotated by different fxllm::rotary_embedding nodes"
    if len(rot.users) != 2:
        return "the rotary node has other users"
    q_pre, k_pre, cos, sin = rot.args[qi], rot.args[ki], rot.args[2], rot.args[3]
    why = _tables_fit(val(q_pre), val(k_pre), val(cos), val(sin))
    if why is not None:
        return why
    dim = int(val(q_pre).shape[-1])
    with graph.inserting_before(attn):
        flat = [
            graph.call_function(aten.squeeze.dim, (graph.call_function(aten.transpose.int, (x, 1, 2)), 0))
            for x in (q_pre, k_pre)
        ]
        tables = [graph.call_function(aten.reshape.default, (t, [-1, dim])) for t in (cos, sin)]
        fused = graph.call_function(
            torch.ops.fxllm.paged_attention_rope.default, (*flat, *attn.args[2:9], *tables, *attn.args[9:])
        )
    fused.meta["nn_module_stack"] = attn.meta.get("nn_module_stack", {})
    attn.replace_all_uses_with(fused)
    graph.erase_node(attn)
    empties = [p for n in (*q_views, *k_views) if is_op(n, aten.cat.default) for p in n.args[0][1:]]
    for node in (*q_views, *k_views, rot):
        graph.erase_node(node)
    for node in dict.fromkeys(empties):  # the empty pass-through slices, now unused
        if isinstance(node, Node) and not node.users and node.op == "call_function":
            graph.erase_node(node)
    return None


@register_pass("fuse_rope_attention", "cache", needs_runtime=True, _builtin=True)
def fuse_rope_attention(gm: GraphModule, ctx: PassContext) -> PassResult:
    """rotary_embedding -> paged_attention  ==>  paged_attention_rope (RoPE inside the attention kernels)."""
    unknown = sorted(set(ctx.options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"fuse_rope_attention: unknown option {unknown[0]!r}; options: {', '.join(OPTIONS)}")
    result = PassResult()
    attentions = [n for n in gm.graph.nodes if is_op(n, torch.ops.fxllm.paged_attention.default)]
    if not attentions:
        return result
    if not ctx.options.get("force", False) and not _fused_kernel_exists(ctx, attentions[0]):
        result.notes.append(f"no fused RoPE + attention kernel on {ctx.device.type}: left unfused")
        return result
    skipped: Counter[str] = Counter()
    for attn in attentions:
        why = _fuse_one(gm, attn)
        if why is None:
            result.num_matches += 1
        else:
            skipped[why] += 1
    if skipped:
        logger.info("fuse_rope_attention: %d of %d attention layers left unfused: %s", sum(skipped.values()),
                    len(attentions), ", ".join(f"{why} x{n}" for why, n in skipped.items()))  # fmt: skip
    result.notes += [f"unfused: {why} x{n}" for why, n in skipped.items()]
    if result.num_matches:
        recompile(gm)
    return result
