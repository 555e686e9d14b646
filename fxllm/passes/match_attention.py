"""match_attention: every causal attention form -> one fxllm::attention per layer.

Forms handled: `F.scaled_dot_product_attention` (with or without repeat_kv, with the GQA flag),
and the eager softmax(QK^T * scale [+ softcap] + mask) V form. The causal/sliding mask that the
model built is dropped: fxllm::attention applies causality itself and takes the sliding window
from the model config of the layer the node came from.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

import fxllm.ops  # noqa: F401  (registers torch.ops.fxllm)
from fxllm.passes.graph_utils import arg, is_op, layer_index, recompile, strip_passthrough, val
from fxllm.passes.registry import PassContext, PassResult, register_pass

logger = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class _Attention:
    anchor: Node  # the node whose value is the [B, H, T, D] attention output
    q: Node
    k: Node  # un-repeated [B, Hkv, T, D]
    v: Node
    scale: float
    softcap: float


def _unrepeat_kv(node: Any) -> Any:
    """Undo Hugging Face's repeat_kv (unsqueeze(2) -> expand -> reshape); returns the [B,Hkv,T,D] node."""
    node = strip_passthrough(node)
    if not is_op(node, aten.reshape, aten.view, aten._unsafe_view):
        return node
    expanded = strip_passthrough(node.args[0])
    if not is_op(expanded, aten.expand):
        return node
    unsqueezed = strip_passthrough(expanded.args[0])
    if not (is_op(unsqueezed, aten.unsqueeze) and arg(unsqueezed, 1, "dim") == 2):
        return node
    return strip_passthrough(unsqueezed.args[0])


def sliding_window_for_layer(config: Any, layer: int | None) -> int:
    """The sliding window the model config gives a layer, or -1 for full attention."""
    if config is None:
        return -1
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer is not None and layer < len(layer_types):
        return int(window) if layer_types[layer] == "sliding_attention" and window else -1
    if window and getattr(config, "use_sliding_window", True):
        return int(window)
    return -1


def _from_sdpa(node: Node) -> _Attention | str:
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    is_causal = arg(node, 5, "is_causal", False)
    if mask is None and not is_causal:
        return "scaled_dot_product_attention without a mask or is_causal (not a causal LM layer)"
    if arg(node, 4, "dropout_p", 0.0) != 0.0:
        return "scaled_dot_product_attention with dropout"
    scale = arg(node, 6, "scale")
    head_dim = val(q).shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    return _Attention(node, q, _unrepeat_kv(k), _unrepeat_kv(v), float(scale), 0.0)


def _scaled_scores(node: Any) -> tuple[Node, Node, float] | None:
    """Match matmul(q, k^T) * scale (or / d); returns (q, k, scale)."""
    node = strip_passthrough(node)
    scale = 1.0
    if is_op(node, aten.mul) and isinstance(node.args[1], (int, float)):
        scale, node = float(node.args[1]), strip_passthrough(node.args[0])
    elif is_op(node, aten.div) and isinstance(node.args[1], (int, float)):
        scale, node = 1.0 / float(node.args[1]), strip_passthrough(node.args[0])
    if not is_op(node, aten.matmul):
        return None
    q, kt = node.args
    kt = strip_passthrough(kt)
    if is_op(kt, aten.transpose) and sorted(int(d) % 4 for d in kt.args[1:3]) == [2, 3]:
        return q, kt.args[0], scale
    return None


def _from_softmax(node: Node) -> _Attention | str | None:
    if arg(node, 1, "dim") not in (-1, 3):
        return None
    scores = strip_passthrough(node.args[0])
    if not is_op(scores, aten.add):
        return "eager softmax attention without an additive mask (not causal)"
    scores = strip_passthrough(scores.args[0])
    softcap = 0.0
    if is_op(scores, aten.mul) and isinstance(scores.args[1], (int, float)):
        tanh = strip_passthrough(scores.args[0])
        if is_op(tanh, aten.tanh):
            inner = strip_passthrough(tanh.args[0])
            if is_op(inner, aten.div) and inner.args[1] == scores.args[1]:
                softcap, scores = float(scores.args[1]), inner.args[0]
    matched = _scaled_scores(scores)
    if matched is None:
        return None
    q, k, scale = matched
    # softmax -> (cast back) -> matmul(probs, v)
    out = node
    while len(out.users) == 1 and is_op(
        next(iter(out.users)), aten.to, aten._to_copy, aten.dropout, aten.clone
    ):
        out = next(iter(out.users))
    consumers = [u for u in out.users if is_op(u, aten.matmul) and u.args[0] is out]
    if len(consumers) != 1 or len(out.users) != 1:
        return "eager softmax attention whose probabilities are used elsewhere (e.g. returned)"
    pv = consumers[0]
    return _Attention(pv, q, _unrepeat_kv(k), _unrepeat_kv(pv.args[1]), scale, softcap)


def _rewrite(gm: GraphModule, found: _Attention, window: int) -> None:
    graph = gm.graph
    with graph.inserting_before(found.anchor):
        qt = graph.call_function(aten.transpose.int, (found.q, 1, 2))
        kt = graph.call_function(aten.transpose.int, (found.k, 1, 2))
        vt = graph.call_function(aten.transpose.int, (found.v, 1, 2))
        att = graph.call_function(
            torch.ops.fxllm.attention.default, (qt, kt, vt, found.scale, window, found.softcap, None)
        )
        out = graph.call_function(aten.transpose.int, (att, 1, 2))
    for new in (qt, kt, vt, att, out):
        new.meta["nn_module_stack"] = found.anchor.meta.get("nn_module_stack", {})
    found.anchor.replace_all_uses_with(out)
    # SDPA is tagged nondeterministic (dropout), so dead-code elimination would keep it running.
    gm.graph.erase_node(found.anchor)


@register_pass("match_attention", "match", _builtin=True)
def match_attention(gm: GraphModule, ctx: PassContext) -> PassResult:
    """SDPA / eager / repeat_kv GQA attention -> fxllm::attention."""
    result = PassResult()
    for node in list(gm.graph.nodes):
        found: _Attention | str | None = None
        if is_op(node, aten.scaled_dot_product_attention):
            found = _from_sdpa(node)
        elif is_op(node, aten.softmax, aten._softmax):
            found = _from_softmax(node)
        if isinstance(found, str):
            result.notes.append(f"{node.name}: {found}")
        elif found is not None:
            window = sliding_window_for_layer(ctx.model_config, layer_index(found.anchor))
            _rewrite(gm, found, window)
            result.num_matches += 1
    if result.num_matches:
        gm.graph.eliminate_dead_code()
        recompile(gm)
    return result
