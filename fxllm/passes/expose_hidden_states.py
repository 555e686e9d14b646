"""expose_hidden_states: the residual stream entering chosen decoder layers becomes a second graph output.

EAGLE-3 heads (docs/speculative.md) read the target's hidden states of three layers (low, middle, high),
concatenated per token: the residual stream entering layer i, as vLLM and SGLang tap it (`hidden_states +
residual` before layer i runs, i.e. Hugging Face's `hidden_states[i]`). The pass finds each chosen layer's
input norm by its module path (`layers.<i>.input_layernorm`): the stream is the norm's input (a plain
fxllm::rms_norm, layer 0) or the sum a fused_add_rms_norm returns as its second output. The graph then
returns (logits, hidden [1, T, len(layers) * H]) for every token of the step.

Off (no match, nothing changed) unless `options["layers"]` lists the layer ids: the builder sets it only
for `speculative.method=eagle3` (fxllm/runtime/speculative/eagle3.py), so a graph without speculation
carries no extra output.
"""

from __future__ import annotations

import operator
import re

import torch
from torch.fx import GraphModule, Node

from fxllm.passes.graph_utils import is_op, recompile
from fxllm.passes.registry import PassContext, PassResult, register_pass

aten = torch.ops.aten
_INPUT_NORM = re.compile(r"layers\.(\d+)\.input_layernorm$")
OPTION = "layers"


def default_layer_ids(num_layers: int) -> list[int]:
    """The public EAGLE-3 choice (2, N // 2, N - 3), clamped into [0, N - 1] for shallow models."""
    return [min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0)]


def _input_norms(gm: GraphModule) -> dict[int, Node]:
    """Layer id -> that layer's input norm node (rms_norm or fused_add_rms_norm), from the module paths."""
    norms: dict[int, Node] = {}
    for node in gm.graph.nodes:
        if not is_op(node, torch.ops.fxllm.rms_norm.default, torch.ops.fxllm.fused_add_rms_norm.default):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        paths = [str(entry[0] if isinstance(entry, tuple) else entry) for entry in stack.values()]
        match = _INPUT_NORM.search(paths[-1]) if paths else None
        if match:
            norms.setdefault(int(match.group(1)), node)
    return norms


def _stream_into(gm: GraphModule, norm: Node) -> Node:
    """The residual stream a layer's input norm reads: its input, or a fused add's sum (output 1)."""
    if is_op(norm, torch.ops.fxllm.rms_norm.default):
        return norm.args[0]  # type: ignore[return-value]
    for user in norm.users:
        if user.target is operator.getitem and user.args[1] == 1:
            return user
    with gm.graph.inserting_after(norm):
        return gm.graph.call_function(operator.getitem, (norm, 1))


@register_pass("expose_hidden_states", "cache", _builtin=True)
def expose_hidden_states(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Return the residual stream entering `options["layers"]` (EAGLE-3's low/middle/high) as output 1."""
    result = PassResult()
    layers = ctx.options.get(OPTION)
    if not layers:
        result.notes.append("off: no layers given (speculative.method=eagle3 sets them)")
        return result
    norms = _input_norms(gm)
    missing = [i for i in layers if i not in norms]
    if missing:
        raise ValueError(
            f"expose_hidden_states: no input norm (layers.<i>.input_layernorm) found for layers {missing}; "
            f"the graph has them for {sorted(norms)}"
        )
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outputs = output.args[0]
    first = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    if isinstance(outputs, (tuple, list)) and len(outputs) > 1:
        raise ValueError(f"expose_hidden_states: the graph already returns {len(outputs)} outputs")
    streams = [_stream_into(gm, norms[i]) for i in layers]
    with gm.graph.inserting_before(output):
        hidden = gm.graph.call_function(aten.cat.default, (streams, -1))
    output.args = ((first, hidden),)
    recompile(gm)
    result.num_matches = len(layers)
    result.notes.append(f"hidden states of layers {list(layers)} returned as output 1")
    return result
