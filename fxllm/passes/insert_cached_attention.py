"""insert_cached_attention: every fxllm::attention -> fxllm::paged_attention over a KV cache.

The graph gains explicit inputs for the step's attention metadata (slot_mapping, block_tables,
seq_lens, query_start_loc) and one key and one value cache per layer, in layer order, each recorded
in the graph's runtime signature (runtime_signature.py) with the cache geometry. The runtime lays
all scheduled tokens of all sequences out flat, so the batch dimension is 1.

With `cache.dtype: fp8` (ctx.kv_cache_dtype) the caches are float8_e4m3fn and every layer's node gets
its key and value scales as graph attributes (`kv_scale_<layer>_k` / `_v`, float32 [1] or [Hkv]): the
checkpoint's (ctx.kv_scales) where it has them, else 1.0. Attributes, not Python floats, so a CUDA
graph replays whatever they hold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxllm.ops.kv_quant import is_fp8, kv_cache_dtype, scale_tensor
from fxllm.passes.graph_utils import fake_mode_of, graph_device, is_op, recompile, val
from fxllm.passes.registry import PassContext, PassResult, register_pass
from fxllm.passes.runtime_signature import GraphInput, InputRole, KVCacheLayer, ensure_signature

logger = logging.getLogger(__name__)

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
    placeholders = gm.graph.find_nodes(op="placeholder")  # indexed, in graph order: no walk per input
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


def add_scale_attribute(gm: GraphModule, name: str, value: torch.Tensor) -> Node:
    """A float32 graph attribute on the graph's device, read by a get_attr node before the first op."""
    gm.register_buffer(name, value.to(device=graph_device(gm), dtype=torch.float32))
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first_op):
        node = gm.graph.get_attr(name)
    mode = fake_mode_of(gm)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(getattr(gm, name), static_shapes=True)
    return node


def _kv_scale_nodes(gm: GraphModule, ctx: PassContext, num_layers: int) -> list[tuple[Node, Node]]:
    """Per layer, the get_attr nodes of its (k_scale, v_scale): the checkpoint's, else 1.0."""
    unknown = sorted(set(ctx.kv_scales) - set(range(num_layers)))
    if unknown:
        raise ValueError(f"the checkpoint has KV scales for layers {unknown}, but the graph has {num_layers} "
                         "attention layers: the loader's layer numbering does not match the graph's")  # fmt: skip
    nodes = []
    for layer in range(num_layers):
        pair = ctx.kv_scales.get(layer, (1.0, 1.0))
        k_scale, v_scale = (scale_tensor(value) for value in pair)
        nodes.append((add_scale_attribute(gm, f"kv_scale_{layer}_k", k_scale),
                      add_scale_attribute(gm, f"kv_scale_{layer}_v", v_scale)))  # fmt: skip
    logger.info("FP8 KV cache: %d layers, K/V scales %s", num_layers,
                f"from the checkpoint for {len(ctx.kv_scales)} layers, 1.0 for the rest" if ctx.kv_scales
                else "1.0 (the checkpoint has none; uncalibrated)")  # fmt: skip
    return nodes


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
    # Every layer's cache is a view of one pool: (blocks, block size) are the same two sizes in every layer.
    # Sharing them also keeps making the fake values cheap (sympy work on each fresh symbol's strides): this
    # pass took 10.2 -> 2.3 s on 16-layer tiny-llama (2-core box at load ~12, a process's second run).
    pool: list[Any] = [None, None]
    for layer, node in enumerate(attentions):
        k, v = val(node.args[1]), val(node.args[2])  # [B, T, Hkv, D]
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
            raise RuntimeError(f"no shape recorded for the key/value of {node.name}; run refresh_meta first")
        heads, dim_k, dim_v = int(k.shape[-2]), int(k.shape[-1]), int(v.shape[-1])
        dtype = kv_cache_dtype(ctx.kv_cache_dtype, k.dtype)
        k_cache = add_input(gm, f"k_cache_{layer}", "k_cache", [*pool, heads, dim_k], dtype, layer)
        if isinstance(val(k_cache), torch.Tensor):
            pool = list(val(k_cache).shape[:2])
        v_cache = add_input(gm, f"v_cache_{layer}", "v_cache", [*pool, heads, dim_v], dtype, layer)
        signature.kv_layers.append(
            KVCacheLayer(layer, str(k_cache.target), str(v_cache.target), heads, dim_k, dim_v, dtype)
        )
        caches += [k_cache, v_cache]
    fp8 = bool(signature.kv_layers) and is_fp8(signature.kv_layers[0].dtype)
    scales = _kv_scale_nodes(gm, ctx, len(attentions)) if fp8 else []
    if ctx.kv_scales and not fp8:
        result.notes.append(
            "the checkpoint's KV scales are unused: cache.dtype is auto (set cache.dtype: fp8)"
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
                    *(scales[layer] if fp8 else ()),
                ),
            )
            out = graph.call_function(torch.ops.aten.unsqueeze.default, (paged, 0))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        result.num_matches += 1
    recompile(gm)
    return result
