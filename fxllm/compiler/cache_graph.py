"""The post-pass graph's weights, never written to disk: each attribute as a recipe (the nodes are
written as plain data by fxllm/compiler/cache_nodes.py).

An attribute is bound on load from the loaded model (`model`: its name there), re-derived from model
tensors by replaying the torch calls a pass made on them (`derived`: merged q/k/v, packed CPU weights),
or, for the small constants capture lifts out of the model's code, stored (`stored`). Weights are
never written to disk. `WeightRecorder` watches the passes' torch calls to learn the derivations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, GraphModule
from torch.overrides import TorchFunctionMode

from fxllm.compiler.cache_nodes import (
    EncodedNode,
    UncacheableGraph,
    decode_callable,
    decode_graph,
    encode_callable,
)

logger = logging.getLogger(__name__)

STORED_LIMIT_BYTES = 4 * 2**20  # lifted constants are tiny; anything larger would be a weight


@dataclass(frozen=True)
class TensorRef:
    """A reference to recipe step `index` (or to its tuple output `item`)."""

    index: int
    item: int | None = None


TensorSig = tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype, str]


def tensor_sig(t: torch.Tensor) -> TensorSig:
    """What identifies a real tensor's memory: storage address, offset, shape, strides, dtype, device."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
            str(t.device))  # fmt: skip


# --- weights -------------------------------------------------------------------------------------


@dataclass
class Step:
    """One recorded torch call on model tensors: fn(*args, **kwargs), tensors as TensorRef / model names."""

    fn: tuple[str, ...]
    args: Any
    kwargs: Any


@dataclass(frozen=True)
class ModelTensor:
    """A tensor of the loaded model, by its name under the capture wrapper (`model.<fqn>`)."""

    name: str


@dataclass
class AttrRecipe:
    """How one graph attribute comes back: from the model, from a derivation step, or stored."""

    target: str
    kind: str  # "parameter", "buffer" or "attribute": how the attribute is registered
    source: ModelTensor | TensorRef | None = None
    stored: torch.Tensor | None = None


@dataclass
class WeightRecipes:
    """Every attribute of a graph, and the derivation steps they need."""

    attrs: list[AttrRecipe] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the tensors written into the entry."""
        return sum(a.stored.numel() * a.stored.element_size() for a in self.attrs if a.stored is not None)


def named_tensors(module: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and buffers, tied ones under every name."""
    yield from module.named_parameters(prefix=prefix, remove_duplicate=False)
    yield from module.named_buffers(prefix=prefix, remove_duplicate=False)


class WeightRecorder(TorchFunctionMode):
    """Records the torch calls made on the model's tensors (or on what such calls returned) while passes
    run, so derived weights can be made again from a freshly loaded model.

    Tensors are recognised by their memory (`tensor_sig`), since passes see the captured graph's tensors,
    which share memory with the model's, and wrap results in Parameters. Memory can be reused once a
    tensor dies, so a later output at the same address replaces the earlier one, and `verify_recipes`
    replays every recipe and compares it with the graph's tensors before anything is written.
    """

    def __init__(self, model: torch.nn.Module, prefix: str = "model") -> None:
        super().__init__()
        self._sources: dict[TensorSig, ModelTensor | TensorRef] = {}
        for name, tensor in named_tensors(model, prefix):
            self._sources.setdefault(tensor_sig(tensor), ModelTensor(name))
        self.steps: list[Step] = []
        self.unrecordable: list[str] = []

    def source_of(self, tensor: torch.Tensor) -> ModelTensor | TensorRef | None:
        """Where a real tensor came from, if it is a model tensor or a recorded output."""
        return self._sources.get(tensor_sig(tensor))

    def _ref(self, value: Any, found: list[bool]) -> Any:
        if type(value) in _REAL_TENSORS:
            if value.is_meta:  # fake tensors are built over meta tensors: no memory, not a weight
                return value
            source = self._sources.get(tensor_sig(value))
            if source is not None:
                found[0] = True
                return source
            return _Opaque(value)
        if isinstance(value, (list, tuple)):
            items = [self._ref(v, found) for v in value]
            return items if isinstance(value, list) else tuple(items)
        if isinstance(value, dict):
            return {k: self._ref(v, found) for k, v in value.items()}
        return value

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, out)
        except Exception as exc:  # bookkeeping must never fail a pass; verify_weights catches what is missed
            self.unrecordable.append(f"{func!r}: {type(exc).__name__}: {exc}")
        return out

    def _record(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        # First, as it is cheap: the passes' fake-tensor work returns no real tensor (~0.3 s of SmolLM2's passes
        # went into walking its arguments).
        if not any(type(o) in _REAL_TENSORS for o in outputs):
            return  # .shape, .dim(), fake tensors, ...
        found = [False]
        ref_args, ref_kwargs = self._ref(args, found), self._ref(kwargs, found)
        if not found[0]:
            return  # proxies, pattern examples: nothing derived from the model
        if _contains_opaque((ref_args, ref_kwargs)):
            self.unrecordable.append(
                f"{func!r}: a tensor argument is neither a model tensor nor derived from one"
            )
            return
        try:
            fn = encode_callable(func)
        except UncacheableGraph as exc:
            self.unrecordable.append(str(exc))
            return
        index = len(self.steps)
        self.steps.append(Step(fn, ref_args, ref_kwargs))
        for i, item in enumerate(outputs):
            if type(item) in _REAL_TENSORS and not item.is_meta:
                self._sources[tensor_sig(item)] = TensorRef(
                    index, i if isinstance(out, (tuple, list)) else None
                )


_REAL_TENSORS = (torch.Tensor, torch.nn.Parameter)


@dataclass(frozen=True)
class _Opaque:
    tensor: torch.Tensor


def _contains_opaque(value: Any) -> bool:
    if isinstance(value, _Opaque):
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains_opaque(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_opaque(v) for v in value.values())
    return False


def _attr_kind(gm: GraphModule, target: str) -> str:
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if leaf in owner._parameters:
        return "parameter"
    if leaf in owner._buffers:
        return "buffer"
    return "attribute"


def attr_targets(graph: Graph) -> list[str]:
    """Attributes the graph reads (get_attr targets), each once, in graph order."""
    return list(dict.fromkeys(str(n.target) for n in graph.nodes if n.op == "get_attr"))


def weight_recipes(gm: GraphModule, recorder: WeightRecorder) -> WeightRecipes:
    """A recipe for every attribute the graph reads; raises UncacheableGraph where there is none."""
    recipes = WeightRecipes()
    needed: set[int] = set()
    for target in attr_targets(gm.graph):
        value = _fetch(gm, target)
        kind = _attr_kind(gm, target)
        if not isinstance(value, torch.Tensor):
            raise UncacheableGraph(f"attribute {target} is a {type(value).__name__}, not a tensor")
        source = recorder.source_of(value)
        if source is None:
            recipes.attrs.append(AttrRecipe(target, kind, stored=value.detach().clone()))
        else:
            recipes.attrs.append(AttrRecipe(target, kind, source))
            if isinstance(source, TensorRef):
                needed.add(source.index)
    if recipes.stored_bytes > STORED_LIMIT_BYTES:
        big = [a.target for a in recipes.attrs if a.stored is not None][:3]
        raise UncacheableGraph(
            f"{recipes.stored_bytes / 2**20:.1f} MiB of attributes ({', '.join(big)}, ...) are neither model "
            "tensors nor derived from them by torch calls the recorder saw"
        )
    # Keep the steps the attributes need (and the steps those read), renumbered in order.
    keep = _closure(recorder.steps, needed)
    renumber = {old: new for new, old in enumerate(sorted(keep))}
    recipes.steps = [_renumbered(recorder.steps[i], renumber) for i in sorted(keep)]
    for attr in recipes.attrs:
        if isinstance(attr.source, TensorRef):
            attr.source = TensorRef(renumber[attr.source.index], attr.source.item)
    return recipes


def _refs(value: Any) -> Iterator[TensorRef]:
    if isinstance(value, TensorRef):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v)


def _closure(steps: list[Step], needed: set[int]) -> set[int]:
    keep: set[int] = set()
    todo = list(needed)
    while todo:
        index = todo.pop()
        if index in keep:
            continue
        keep.add(index)
        todo += [ref.index for ref in _refs((steps[index].args, steps[index].kwargs))]
    return keep


def _map_refs(value: Any, fn: Callable[[TensorRef], Any]) -> Any:
    if isinstance(value, TensorRef):
        return fn(value)
    if isinstance(value, list):
        return [_map_refs(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(_map_refs(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_refs(v, fn) for k, v in value.items()}
    return value


def _renumbered(step: Step, renumber: Mapping[int, int]) -> Step:
    def move(ref: TensorRef) -> TensorRef:
        return TensorRef(renumber[ref.index], ref.item)

    return Step(step.fn, _map_refs(step.args, move), _map_refs(step.kwargs, move))


def _fetch(module: torch.nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve(value: Any, model: Mapping[str, torch.Tensor], results: list[Any]) -> Any:
    if isinstance(value, ModelTensor):
        if value.name not in model:
            raise KeyError(f"the loaded model has no tensor {value.name}")
        return model[value.name]
    if isinstance(value, TensorRef):
        out = results[value.index]
        return out if value.item is None else out[value.item]
    if isinstance(value, list):
        return [_resolve(v, model, results) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, model, results) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, model, results) for k, v in value.items()}
    return value


@torch.no_grad()
def bind_weights(recipes: WeightRecipes, model_tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Each attribute's tensor: looked up in `model_tensors`, re-derived by replaying the steps, or stored.
    A step's result is dropped after its last reader, so padded copies and the like do not pile up."""
    last_use: dict[int, int] = {}
    for index, step in enumerate(recipes.steps):
        for ref in _refs((step.args, step.kwargs)):
            last_use[ref.index] = index
    wanted = {a.source.index for a in recipes.attrs if isinstance(a.source, TensorRef)}
    results: list[Any] = []
    for index, step in enumerate(recipes.steps):
        fn = decode_callable(step.fn)
        args, kwargs = (
            _resolve(step.args, model_tensors, results),
            _resolve(step.kwargs, model_tensors, results),
        )
        results.append(fn(*args, **kwargs))
        del args, kwargs
        for ref in set(_refs((step.args, step.kwargs))):
            if last_use[ref.index] == index and ref.index not in wanted:
                results[ref.index] = None
    values: dict[str, Any] = {}
    for attr in recipes.attrs:
        values[attr.target] = (
            attr.stored if attr.stored is not None else _resolve(attr.source, model_tensors, results)
        )
    return values


def build_graph_module(
    encoded: list[EncodedNode], recipes: WeightRecipes, values: Mapping[str, Any], meta: Mapping[str, Any]
) -> GraphModule:
    """A GraphModule over the decoded graph, attributes registered as they were (same paths and kinds)."""
    root = torch.nn.Module()
    for attr in recipes.attrs:
        owner = root
        *path, leaf = attr.target.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        value = values[attr.target]
        if attr.kind == "parameter":
            owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
        elif attr.kind == "buffer":
            owner.register_buffer(leaf, value)
        else:
            setattr(owner, leaf, value)
    gm = GraphModule(root, decode_graph(encoded))
    gm.meta.update(meta)
    return gm


def verify_weights(values: Mapping[str, Any], gm: GraphModule) -> str | None:
    """None when every rebuilt attribute equals the graph's own bit for bit (same shape, strides and
    dtype); else what differs. A recipe that passes this on the cold start is what a warm start replays."""
    for target, value in values.items():
        original = _fetch(gm, target)
        if not isinstance(value, torch.Tensor) or not isinstance(original, torch.Tensor):
            return f"attribute {target} is not a tensor"
        same_layout = (value.shape, value.stride(), value.dtype, value.device) == (
            original.shape, original.stride(), original.dtype, original.device)  # fmt: skip
        if same_layout and value.element_size() == 1 and value.is_floating_point():
            # torch.equal has no float8 kernel (its alias fast path checks NaNs): compare the bytes.
            value, original = value.view(torch.uint8), original.view(torch.uint8)
        if not same_layout or not torch.equal(value, original):
            return f"attribute {target} does not come back equal from its recipe"
    return None
