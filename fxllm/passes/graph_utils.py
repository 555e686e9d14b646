"""Small helpers shared by the passes: node tests, view stripping, metadata refresh."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

logger = logging.getLogger(__name__)
aten = torch.ops.aten

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def is_op(node: Any, *targets: Any) -> bool:
    """True if `node` is a call_function to one of `targets` (OpOverload or OpOverloadPacket)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    for target in targets:
        if node.target is target:
            return True
        packet = getattr(node.target, "overloadpacket", None)
        if packet is not None and packet is target:
            return True
    return False


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` / keyword `name` of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any) -> Any:
    """The fake value recorded for a node (a FakeTensor, SymInt, ...), or None."""
    return node.meta.get("val") if isinstance(node, Node) else None


def is_noop_slice(node: Node) -> bool:
    """A slice that keeps the whole dimension (x[:, :] in Python)."""
    if not is_op(node, aten.slice):
        return False
    src = val(node.args[0])
    dim = arg(node, 1, "dim", 0)
    start = arg(node, 2, "start", None)
    end = arg(node, 3, "end", None)
    step = arg(node, 4, "step", 1)
    if src is None or step != 1 or start not in (None, 0):
        return False
    if end is None or (isinstance(end, int) and end >= 2**62):
        return True
    size = src.shape[dim]
    return isinstance(end, int) and isinstance(size, int) and end >= size


def strip_passthrough(node: Any) -> Any:
    """Walk back through ops that do not change values: no-op slices, clone, contiguous, alias."""
    while isinstance(node, Node) and (
        is_noop_slice(node) or is_op(node, aten.clone, aten.contiguous, aten.alias, aten.detach)
    ):
        node = node.args[0]
    return node


def layer_index(node: Node) -> int | None:
    """The decoder-layer index a node came from, read off its nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        match = _LAYER_RE.search(str(path))
        if match:
            return int(match.group(1))
    return None


def fake_mode_of(gm: GraphModule) -> Any:
    """The FakeTensorMode that produced the graph's placeholder values, if any."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode([val(n) for n in gm.graph.find_nodes(op="placeholder")])  # indexed: no graph walk


def refresh_meta(gm: GraphModule) -> None:
    """Fill node.meta['val'] for nodes a rewrite created (passes rely on it).

    Rewrites preserve the values of the nodes they keep, so only nodes without a value are
    computed, in graph order, by running their target on fake inputs: far cheaper than
    re-propagating a 2,000-node graph after every pass. A model's layers repeat the same ops on
    the same (symbolic) shapes, so a value is computed once per target and input signature and
    shared by the nodes that repeat it (`_MemoizedValues`).
    """
    mode = fake_mode_of(gm)
    if mode is None:
        return
    missing = [n for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta]
    if not missing:
        return
    prev = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    values = _MemoizedValues(mode)
    try:
        with (
            mode,
            mode.shape_env.ignore_fresh_unbacked_symbols() if mode.shape_env else contextlib.nullcontext(),
        ):
            for node in gm.graph.nodes:
                if node.op == "get_attr" and "val" not in node.meta:
                    node.meta["val"] = mode.from_tensor(fetch_attr(gm, node.target), static_shapes=True)
                elif node.op == "call_function" and "val" not in node.meta:
                    node.meta["val"] = values.compute(node)
    finally:
        mode.allow_non_fake_inputs = prev
    REFRESH_COUNTS["computed"] += values.computed
    REFRESH_COUNTS["shared"] += values.shared


REFRESH_COUNTS = {"computed": 0, "shared": 0}  # fake values refresh_meta computed / shared (tests read them)


def size_key(size: Any) -> Any:
    """A hashable stand-in for a size or stride: an int itself, a symbolic one by its expression. Printing
    the expression (str) cost a third of the memoized passes' time; the expression object hashes cheaply."""
    if isinstance(size, torch.SymInt | torch.SymFloat | torch.SymBool):
        expr = getattr(size.node, "_expr", None)  # the raw expression: no replacement lookups
        return ("sym", str(size) if expr is None else expr)
    return size


def value_signature(value: Any) -> Any:
    """What an op's fake output depends on in an input: a tensor's type, dtype, device, sizes, strides and
    offset (symbolic ones by expression), a constant's type and value. TypeError for anything else."""
    if isinstance(value, torch.Tensor):
        return ("tensor", type(value).__name__, value.dtype, str(value.device), value.requires_grad,
                tuple(map(size_key, value.shape)), tuple(map(size_key, value.stride())),
                size_key(value.storage_offset()))  # fmt: skip
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return (type(value).__name__, size_key(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(value_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, value_signature(v)) for k, v in value.items()))
    if value is None or isinstance(value, (int, float, bool, str, torch.dtype, torch.device)):
        return ("const", type(value).__name__, repr(value))
    if isinstance(value, (torch.memory_format, torch.layout)):
        return ("const", type(value).__name__, str(value))
    raise TypeError(f"no signature for {type(value).__name__}")


class _MemoizedValues:
    """Fake values of new nodes, computed once per (target, input signature) within one refresh.

    Shared only where computing one made no fresh symbol (an unbacked size is a new unknown per node, so
    such values are computed per node): the shared value is then exactly what running the op again
    would give, apart from object identity (inlined references already share values that way).
    """

    def __init__(self, mode: Any) -> None:
        self.mode = mode
        self.memo: dict[Any, Any] = {}
        self.computed = 0
        self.shared = 0

    def _symbols(self) -> int:
        env = self.mode.shape_env
        return -1 if env is None else len(env.var_to_range)

    def compute(self, node: Node) -> Any:
        """The fake value of call_function `node`, whose inputs have theirs."""
        args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
        try:
            key: Any = (node.target, value_signature(args), value_signature(kwargs))
        except TypeError:
            key = None
        if key is not None and key in self.memo:
            self.shared += 1
            return self.memo[key]
        before = self._symbols()
        value = _fake_value(node.target, args, kwargs)
        self.computed += 1
        if key is not None and before >= 0 and self._symbols() == before:
            self.memo[key] = value
        return value


def _fake_value(target: Any, args: Any, kwargs: Any) -> Any:
    """Run `target` on fake inputs. aten.linear is composite: its C++ kernel calls numel() on
    CUDA (torch 2.11), which symbolic sizes forbid, so its output is built from the shapes."""
    if target is aten.linear.default:
        x, weight = args[0], args[1]
        return x.new_empty((*x.shape[:-1], weight.shape[0]))
    return target(*args, **kwargs)


# The graph run_passes transforms, and whether a pass changed its code since it was last generated.
_deferred: ContextVar[tuple[GraphModule, list[bool]] | None] = ContextVar(
    "fxllm_deferred_recompile", default=None
)


def recompile(gm: GraphModule) -> None:
    """`gm.recompile()`, or, while run_passes holds `gm` (`deferred_recompile`), once after the last pass:
    generating a 2,000-node graph's Python code after every pass cost SmolLM2 about a second."""
    deferred = _deferred.get()
    if deferred is not None and deferred[0] is gm:
        deferred[1][0] = True
    else:
        gm.recompile()


@contextlib.contextmanager
def deferred_recompile(gm: GraphModule) -> Iterator[None]:
    """Within: `recompile(gm)` only marks `gm` stale; on leaving (and at `flush_recompile`) it recompiles once."""
    token = _deferred.set((gm, [False]))
    try:
        yield
    finally:
        flush_recompile(gm)
        _deferred.reset(token)


def flush_recompile(gm: GraphModule) -> None:
    """Recompile `gm` now if a deferred `recompile(gm)` is pending (before code that runs or reads `gm.code`)."""
    deferred = _deferred.get()
    if deferred is not None and deferred[0] is gm and deferred[1][0]:
        deferred[1][0] = False
        gm.recompile()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside: for copying weights, which is memory-bound. One thread gets
    the bandwidth, while two wait on each other whenever the box is busy: concatenating SmolLM2's 280 MB of
    q/k/v and gate/up weights took 2.4 s wall (1.2 s CPU) on two threads and 0.08-0.5 s on one (2 cores, load 6)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fetch_attr(gm: GraphModule, target: str) -> Any:
    """The module attribute a get_attr node's dotted `target` names."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def drop_attr_if_unused(gm: GraphModule, node: Node) -> None:
    """Erase get_attr `node` once nothing uses it, and its attribute once no get_attr reads it."""
    if node.users:
        return
    target = node.target
    gm.graph.erase_node(node)
    if not gm.graph.find_nodes(op="get_attr", target=target):  # indexed: no walk over the graph
        owner_path, _, leaf = str(target).rpartition(".")
        delattr(fetch_attr(gm, owner_path) if owner_path else gm, leaf)


@dataclass(frozen=True)
class ConstantLinear:
    """An `aten.linear` node whose weight (and bias, if any) are graph attributes."""

    node: Node
    weight: Node  # the get_attr node of the weight
    bias: Node | None  # the get_attr node of the bias, or None
    tensor: torch.Tensor  # the weight's tensor


def constant_linears(gm: GraphModule, notes: list[str] | None = None) -> Iterator[ConstantLinear]:
    """The `aten.linear` nodes of `gm` whose weight and bias are attributes, in graph order; each other one
    adds `"<node>: why"` to `notes`. Listed up front, so callers may rewrite each node as it comes."""
    for node in gm.graph.find_nodes(op="call_function", target=aten.linear.default):
        weight, bias = node.args[1], arg(node, 2, "bias")
        if not (isinstance(weight, Node) and weight.op == "get_attr"):
            why = "weight is not a constant"
        elif bias is not None and not (isinstance(bias, Node) and bias.op == "get_attr"):
            why = "bias is not a constant"
        else:
            yield ConstantLinear(node, weight, bias, fetch_attr(gm, str(weight.target)))
            continue
        if notes is not None:
            notes.append(f"{node.name}: {why}")


def split_merged_output(gm: GraphModule, merged: Node, members: list[Node], widths: list[int]) -> None:
    """Give each merged member its columns of `merged` (a slice of the last dimension, in member order), then
    erase the members. Call it inside the graph's insertion point for the slices."""
    start = 0
    for member, width in zip(members, widths):
        member.replace_all_uses_with(
            gm.graph.call_function(torch.ops.aten.slice.Tensor, (merged, -1, start, start + width))
        )
        start += width
    for member in members:
        gm.graph.erase_node(member)


def graph_device(gm: GraphModule) -> torch.device:
    """The device of the graph's first tensor input, else of its first weight (a graph from the compile
    cache has no fake values), else cpu."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = val(node)
        if isinstance(value, torch.Tensor):
            return value.device
    for tensor in (*gm.parameters(), *gm.buffers()):
        return tensor.device
    return torch.device("cpu")


def count_ops(gm: GraphModule) -> dict[str, int]:
    """Histogram of call_function targets, keyed by a readable name."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = str(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts
