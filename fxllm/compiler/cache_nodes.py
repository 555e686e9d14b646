"""The post-pass graph's nodes as plain picklable data: each call target by an importable name, each
argument as plain values and references to earlier nodes, node names kept so the code comes back the same.
The weights are the other half of an entry (fxllm/compiler/cache_graph.py)."""

from __future__ import annotations

import builtins
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, Node


class UncacheableGraph(RuntimeError):
    """The graph holds something the cache cannot write down; the message says what."""


@dataclass(frozen=True)
class NodeRef:
    """A reference to the graph's node number `index` inside encoded arguments."""

    index: int


# --- function references -------------------------------------------------------------------------


def encode_callable(fn: Any) -> tuple[str, ...]:
    """A name that `decode_callable` turns back into `fn`; raises UncacheableGraph if there is none."""
    if isinstance(fn, torch._ops.OpOverload):
        return ("op", fn.namespace, fn._schema.name.split("::", 1)[1], fn._overloadname)
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return ("packet", *fn._qualified_op_name.split("::", 1))
    if isinstance(fn, torch._ops.HigherOrderOperator):
        raise UncacheableGraph(f"higher-order op {fn.name()} in the graph")
    owner = getattr(fn, "__objclass__", None)
    name = getattr(fn, "__name__", None)
    public = torch.overrides.resolve_name(fn)  # "torch.cat", "torch.Tensor.view", "torch.nn.functional.pad"
    if owner is not None and name and isinstance(owner, type) and issubclass(torch.Tensor, owner):
        ref: tuple[str, ...] = ("tensor_method", name)
    elif public is not None and public.startswith("torch.") and not public.endswith("__get__"):
        ref = ("torch", public)
    elif isinstance(fn, property) or type(fn).__name__ == "getset_descriptor":
        raise UncacheableGraph(f"tensor attribute {fn!r}")
    else:
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
        if module is None or qualname is None or "<" in qualname:
            raise UncacheableGraph(f"{fn!r} has no importable name")
        ref = ("fn", module, qualname)
    try:
        resolved = decode_callable(ref)
    except Exception as exc:
        raise UncacheableGraph(f"{fn!r} does not resolve by its name {ref}: {exc}") from None
    if resolved is not fn and resolved != fn:
        raise UncacheableGraph(f"{fn!r} resolves by its name {ref} to another object")
    return ref


def decode_callable(ref: tuple[str, ...]) -> Any:
    """The function or op `encode_callable` named."""
    kind = ref[0]
    if kind == "op":
        _, namespace, name, overload = ref
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    if kind == "packet":
        return getattr(getattr(torch.ops, ref[1]), ref[2])
    if kind == "tensor_method":
        return getattr(torch.Tensor, ref[1])
    if kind == "torch":  # a public torch path, e.g. torch.nn.functional.pad
        obj: Any = torch
        for part in ref[1].split(".")[1:]:
            obj = getattr(obj, part)
        return obj
    _, module, qualname = ref
    obj = importlib.import_module(module) if module != "builtins" else builtins
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# --- graph ---------------------------------------------------------------------------------------

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format,
          type(Ellipsis))  # fmt: skip


def _encode_arg(value: Any, index: Mapping[Node, int]) -> Any:
    if isinstance(value, Node):
        return NodeRef(index[value])
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):  # immutable_list and friends become plain lists and tuples
        items = [_encode_arg(v, index) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _encode_arg(v, index) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(_encode_arg(v, index) for v in (value.start, value.stop, value.step)))
    raise UncacheableGraph(f"argument of type {type(value).__name__} ({value!r})")


def _decode_arg(value: Any, nodes: list[Node]) -> Any:
    if isinstance(value, NodeRef):
        return nodes[value.index]
    if isinstance(value, list):
        return [_decode_arg(v, nodes) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode_arg(v, nodes) for v in value)
    if isinstance(value, dict):
        return {k: _decode_arg(v, nodes) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(_decode_arg(v, nodes) for v in (value.start, value.stop, value.step)))
    return value


EncodedNode = tuple[str, str, Any, Any, Any]  # op, name, target, args, kwargs


def encode_graph(graph: Graph) -> list[EncodedNode]:
    """The graph's nodes as plain picklable data (names kept, so the code is the same on load)."""
    index: dict[Node, int] = {}
    encoded: list[EncodedNode] = []
    for i, node in enumerate(graph.nodes):
        if node.op == "call_module":
            raise UncacheableGraph(f"call_module node {node.name} ({node.target})")
        target = encode_callable(node.target) if node.op in ("call_function", "call_method") and callable(
            node.target) else node.target  # fmt: skip
        encoded.append(
            (node.op, node.name, target, _encode_arg(node.args, index), _encode_arg(node.kwargs, index))
        )
        index[node] = i
    return encoded


def decode_graph(encoded: list[EncodedNode]) -> Graph:
    """The graph `encode_graph` wrote down."""
    graph = Graph()
    nodes: list[Node] = []
    for op, name, target, args, kwargs in encoded:
        if isinstance(target, tuple):
            target = decode_callable(target)
        node = graph.create_node(op, target, _decode_arg(args, nodes), _decode_arg(kwargs, nodes), name=name)
        if node.name != name:
            raise ValueError(f"node {name} came back as {node.name}")
        nodes.append(node)
    return graph
