"""insert_cached_attention: every fxllm::attention -> fxllm::paged_attention over a KV cache.

The graph gains explicit inputs for the step's attention metadata (slot_mapping, block_tables,
seq_lens, query_start_loc) and one key and one value cache per layer, in layer order, each recorded
in the graph's runtime signature (runtime_signature.py) with the cache geometry. The runtime lays
all scheduled tokens of all sequences out flat, so the batch dimension is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxllm.passes.graph_utils import fake_mode_of, graph_device, is_op, val
from fxllm.passes.registry import PassContext, PassResult, register_pass
from fxllm.passes.runtime_signature import GraphInput, InputRole, KVCacheLayer, ensure_signature

METADATA_INPUTS: tuple[str, ...] = ("slot_mapping", "block_tables", "seq_lens", "query_start_loc")


def add_input(
    gm: GraphModule,
    name: str,
    role: InputRole,
    shape: Sequence[Any] = (),
    dtype: torch.dtype = torch.int32,
    layer: int | None = None,
) -> Node:
    """Append a graph input after the existing ones and record it in the runtime signature; `shape`
    entries of None get fresh sizes."""
    signature = ensure_signature(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    signature.inputs.append(GraphInput(str(node.target), role, dtype, layer))
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
    metadata = {name: add_input(gm, name, name, *shapes[name]) for name in METADATA_INPUTS}  # type: ignore[arg-type]
    caches = []
    signature = ensure_signature(gm)
    for layer, node in enumerate(attentions):
        k, v = val(node.args[1]), val(node.args[2])  # [B, T, Hkv, D]
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
            raise RuntimeError(f"no shape recorded for the key/value of {node.name}; run refresh_meta first")
        heads, dim_k, dim_v = int(k.shape[-2]), int(k.shape[-1]), int(v.shape[-1])
        k_cache = add_input(gm, f"k_cache_{layer}", "k_cache", [None, None, heads, dim_k], k.dtype, layer)
        v_cache = add_input(gm, f"v_cache_{layer}", "v_cache", [None, None, heads, dim_v], v.dtype, layer)
        signature.kv_layers.append(
            KVCacheLayer(layer, str(k_cache.target), str(v_cache.target), heads, dim_k, dim_v, k.dtype)
        )
        caches += [k_cache, v_cache]
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
    gm.recompile()
    return result
