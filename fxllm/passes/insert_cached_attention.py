"""insert_cached_attention: every fxllm::attention -> fxllm::paged_attention over a KV cache.

The graph gains explicit inputs for the step's attention metadata (slot_mapping, block_tables,
seq_lens, query_start_loc) and one key and one value cache per layer, in layer order. The
runtime lays all scheduled tokens of all sequences out flat, so the batch dimension is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxllm.passes.graph_utils import fake_mode_of, graph_device, is_op, val
from fxllm.passes.registry import PassContext, PassResult, register_pass

METADATA_INPUTS: tuple[str, ...] = ("slot_mapping", "block_tables", "seq_lens", "query_start_loc")


def add_placeholder(
    gm: GraphModule, name: str, shape: Sequence[Any] = (), dtype: torch.dtype = torch.int32
) -> Node:
    """Append a graph input after the existing ones; `shape` entries of None get fresh sizes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    node.meta["fxllm_runtime_input"] = True
    mode = fake_mode_of(gm)
    if mode is not None and mode.shape_env is not None:
        # Later passes and refresh_meta need a value; unknown sizes become fresh unbacked symbols.
        with mode.shape_env.ignore_fresh_unbacked_symbols():
            sizes = [mode.shape_env.create_unbacked_symint() if s is None else s for s in shape]
        with mode:
            node.meta["val"] = torch.empty(sizes, dtype=dtype, device=graph_device(gm))
    return node


def num_tokens_symbol(gm: GraphModule) -> Any:
    """The size of the flat token dimension (input_ids' second dim)."""
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return val(first).shape[1] if isinstance(val(first), torch.Tensor) else None


def kv_cache_input_names(num_layers: int) -> list[str]:
    """Names of the per-layer cache inputs, in the order the graph takes them."""
    return [f"{kind}_cache_{i}" for i in range(num_layers) for kind in ("k", "v")]


@register_pass("insert_cached_attention", "cache", needs_runtime=True, _builtin=True)
def insert_cached_attention(gm: GraphModule, ctx: PassContext) -> PassResult:
    """fxllm::attention -> fxllm::paged_attention with metadata and KV cache graph inputs."""
    graph = gm.graph
    attentions = [n for n in graph.nodes if is_op(n, torch.ops.fxllm.attention.default)]
    result = PassResult()
    if not attentions:
        result.notes.append("no fxllm::attention in the graph: run match_attention first")
        return result
    tokens = num_tokens_symbol(gm)
    shapes = {"slot_mapping": ([tokens], torch.long), "block_tables": ([None, None], torch.int32),
              "seq_lens": ([None], torch.int32), "query_start_loc": ([None], torch.int32)}  # fmt: skip
    metadata = {name: add_placeholder(gm, name, *shapes[name]) for name in METADATA_INPUTS}
    caches = []
    for layer, name in enumerate(kv_cache_input_names(len(attentions))):
        kv = val(attentions[layer // 2].args[1 + layer % 2])
        heads, dim = (kv.shape[-2], kv.shape[-1]) if isinstance(kv, torch.Tensor) else (None, None)
        caches.append(
            add_placeholder(gm, name, [None, None, heads, dim], kv.dtype if kv is not None else torch.float32)
        )
    for layer, node in enumerate(attentions):
        q, k, v, scale, window, softcap, sinks = (*node.args, *([None] * (7 - len(node.args))))[:7]
        with graph.inserting_before(node):
            flat = [graph.call_function(torch.ops.aten.squeeze.dim, (t, 0)) for t in (q, k, v)]
            paged = graph.call_function(
                torch.ops.fxllm.paged_attention.default,
                (
                    *flat,
                    caches[2 * layer],
                    caches[2 * layer + 1],
                    *metadata.values(),
                    scale,
                    -1 if window is None else window,
                    0.0 if softcap is None else softcap,
                    sinks,
                ),
            )
            out = graph.call_function(torch.ops.aten.unsqueeze.default, (paged, 0))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        result.num_matches += 1
    gm.meta["fxllm_num_kv_layers"] = len(attentions)
    gm.recompile()
    return result
