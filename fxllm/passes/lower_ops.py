"""lower_ops: the last pass. Every canonical `fxllm::` node gets the implementation chosen for it.

Per node, from the config's preference (`compile.op_backends`), the node's device and argument
dtypes/shapes, and each backend's capability check (fxllm/backends/registry.py), the node is
rewritten to call that backend's own op (`fxllm_cpu::packed_linear`, `fxllm_triton::rms_norm`, ...),
or to the reference: traced inline into ATen ops where the reference is traceable (Inductor then
fuses it with its neighbours), else the opaque `fxllm_torch::<op>`. No canonical node remains, and
every decision is written into the graph (`node.meta["fxllm_lowering"]` and
`gm.meta["fxllm_lowering"]`), which is what `fxllm compile --explain` prints.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx

from fxllm.backends.registry import (
    REFERENCE,
    OpSite,
    check_preferences,
    choose_implementation,
    define_backend_op,
    implementation,
    import_device_backends,
)
from fxllm.ops.registry import CanonicalOp, canonical_op_of
from fxllm.passes.graph_utils import fake_mode_of, recompile, val, value_signature
from fxllm.passes.registry import PassContext, PassResult, register_pass

logger = logging.getLogger(__name__)

INLINED = "inlined"


@dataclass(frozen=True)
class LoweringDecision:
    """What one canonical node became, and why."""

    node: str  # the node's name before lowering
    op: str  # canonical op name
    backend: str  # "torch" for the reference
    target: str  # the op now called, or "inlined"
    reason: str
    fallback: bool = False


_REFERENCE_OPS: dict[str, torch._ops.OpOverload] = {}


def reference_op(canonical: CanonicalOp) -> torch._ops.OpOverload:
    """`fxllm_torch::<op>`: the reference as an opaque op (for references that cannot be inlined)."""
    if canonical.name not in _REFERENCE_OPS:
        _REFERENCE_OPS[canonical.name] = define_backend_op(canonical.name, REFERENCE, canonical.overload)
    return _REFERENCE_OPS[canonical.name]


def schema_args(node: Node, schema: torch.FunctionSchema) -> list[Any]:
    """The node's arguments in schema order, defaults filled in."""
    values = []
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            values.append(node.args[index])
        elif argument.name in node.kwargs:
            values.append(node.kwargs[argument.name])
        elif argument.has_default_value():
            values.append(argument.default_value)
        else:
            raise ValueError(f"{node.format_node()}: missing argument {argument.name!r} of {schema.name}")
    return values


def op_site(node: Node, canonical: CanonicalOp, args: Sequence[Any], default_device: torch.device) -> OpSite:
    """The capability-check view of `node`: fake values of its arguments and its device."""
    values = tuple(val(a) if isinstance(a, Node) else a for a in args)
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    return OpSite(canonical.name, tensors[0].device if tensors else default_device, values)


def _trace_key(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, ...] | None:
    """What a traced reference depends on: the function, each tensor input's dtype, device and shape,
    and every constant argument; None when an input is not a plain tensor value (trace it alone)."""
    key: list[Any] = [fn]
    for a in args:
        if isinstance(a, Node):
            value = val(a)
            if not isinstance(value, torch.Tensor):
                return None
            key.append(value_signature(value))
        else:
            key.append(("const", repr(a)))
    return tuple(key)


def _trace_reference(gm: GraphModule, fn: Callable[..., Any], args: Sequence[Any]) -> GraphModule:
    positions = [i for i, a in enumerate(args) if isinstance(a, Node)]

    def call(*inputs: Any) -> Any:
        full = list(args)
        for i, value in zip(positions, inputs):
            full[i] = value
        return fn(*full)

    mode = fake_mode_of(gm)
    if mode is None:
        raise RuntimeError("cannot inline a reference: the graph has no fake values (run refresh_meta)")
    ignore = mode.shape_env.ignore_fresh_unbacked_symbols() if mode.shape_env else contextlib.nullcontext()
    with mode, ignore:
        values = [val(args[i]) for i in positions]
        # Nodes inlined from one shared trace share its fake values: two such arguments would be one object,
        # and make_fx would trace both as one input (silu_and_mul(gate, up) read up twice). Distinct fakes.
        seen: set[int] = set()
        for j, value in enumerate(values):
            if id(value) in seen:
                values[j] = torch.empty_strided(
                    value.shape, value.stride(), dtype=value.dtype, device=value.device
                )
            seen.add(id(value))
        return make_fx(call, tracing_mode="fake", pre_dispatch=True)(*values)


def inline_call(
    gm: GraphModule,
    node: Node,
    fn: Callable[..., Any],
    args: Sequence[Any],
    traced: dict[tuple[Any, ...], GraphModule] | None = None,
) -> None:
    """Replace `node` by the ATen ops `fn(*args)` traces to (on the nodes' fake values). Nodes with the
    same key (`_trace_key`) share one trace through `traced`: a model's layers repeat the same ops."""
    key = _trace_key(fn, args)
    sub = traced.get(key) if traced is not None and key is not None else None
    if sub is None:
        sub = _trace_reference(gm, fn, args)
        if traced is not None and key is not None:
            traced[key] = sub
    constants = {}
    for sub_node in sub.graph.nodes:  # constants the reference created (rare) move into gm
        if sub_node.op == "get_attr":
            name = f"_lowered_{node.name}_{sub_node.target}"
            setattr(gm, name, getattr(sub, str(sub_node.target)))
            constants[sub_node] = name
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env: dict[Node, Any] = dict(zip(placeholders, [a for a in args if isinstance(a, Node)]))
    with gm.graph.inserting_before(node):
        for sub_node, name in constants.items():
            env[sub_node] = gm.graph.get_attr(name)
        out = gm.graph.graph_copy(sub.graph, env)
    if isinstance(out, (tuple, list)):
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise RuntimeError(
                    f"cannot inline {node.name}: its tuple result is used by {user.format_node()}"
                )
            user.replace_all_uses_with(out[user.args[1]])
            gm.graph.erase_node(user)
    else:
        node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def lower_node(
    gm: GraphModule,
    node: Node,
    canonical: CanonicalOp,
    ctx: PassContext,
    traced: dict[tuple[Any, ...], GraphModule] | None = None,
) -> LoweringDecision:
    """Rewrite one canonical node to its chosen implementation."""
    args = schema_args(node, canonical.overload._schema)
    site = op_site(node, canonical, args, ctx.device)
    choice = choose_implementation(site, ctx.op_backends.get(canonical.name))
    name = node.name
    if choice.backend != REFERENCE:
        target = implementation(canonical.name, choice.backend).target()
        assert target is not None  # choose_implementation checked that it loads
        node.target = target
    elif canonical.inline:
        inline_call(gm, node, canonical.traceable_reference, args, traced)
        return LoweringDecision(name, canonical.name, REFERENCE, INLINED, choice.reason, choice.fallback)
    else:
        target = reference_op(canonical)
        node.target = target
    decision = LoweringDecision(
        name, canonical.name, choice.backend, str(target), choice.reason, choice.fallback
    )
    node.meta["fxllm_lowering"] = decision
    return decision


@register_pass("lower_ops", "lower", _builtin=True)
def lower_ops(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite every canonical fxllm op node to its chosen implementation (or inline the reference)."""
    import_device_backends(ctx.device)  # first: a preference may name a backend only the device registers
    check_preferences(ctx.op_backends)
    decisions = []
    traced: dict[tuple[Any, ...], GraphModule] = {}
    for node in list(gm.graph.nodes):
        canonical = canonical_op_of(node.target) if node.op == "call_function" else None
        if canonical is not None:
            decisions.append(lower_node(gm, node, canonical, ctx, traced))
    gm.meta["fxllm_lowering"] = decisions
    recompile(gm)
    fallbacks = Counter(f"{d.op} ({d.reason})" for d in decisions if d.fallback)
    if fallbacks:
        logger.warning("lower_ops: %d node(s) fell back to the reference: %s", sum(fallbacks.values()),
                       ", ".join(f"{k} x{v}" for k, v in fallbacks.items()))  # fmt: skip
    result = PassResult(num_matches=len(decisions))
    result.notes += [f"{k} x{v}" for k, v in summary(decisions).items()]
    return result


def lowering_decisions(gm: GraphModule) -> list[LoweringDecision]:
    """The decisions the lowering pass recorded on `gm` (empty if it did not run)."""
    return list(gm.meta.get("fxllm_lowering", []))


def summary(decisions: Sequence[LoweringDecision]) -> Counter[str]:
    """'op -> target [reason]' counted over nodes."""
    return Counter(f"{d.op} -> {d.target} [{d.reason}]" for d in decisions)


def lowering_table(gm: GraphModule) -> str:
    """The per-node implementation table of a lowered graph, grouped, then node by node."""
    decisions = lowering_decisions(gm)
    if not decisions:
        return "lowering: no canonical op nodes were lowered (lower_ops disabled or nothing matched)"
    lines = [f"{'op':<24}{'implementation':<40}{'nodes':>6}  why"]
    groups = Counter((d.op, d.target, d.reason) for d in decisions)
    for (op, target, reason), count in groups.items():
        lines.append(f"{op:<24}{target:<40}{count:>6}  {reason}")
    lines += ["", "per node:"]
    lines += [f"  {d.node:<32}{d.op:<24}{d.target}" for d in decisions]
    return "\n".join(lines)


def implementations_chosen(gm: GraphModule) -> dict[str, str]:
    """op -> the backend(s) its nodes got, e.g. {"rms_norm": "triton", "attention": "torch"}."""
    chosen: dict[str, set[str]] = {}
    for decision in lowering_decisions(gm):
        chosen.setdefault(decision.op, set()).add(decision.backend)
    return {op: ",".join(sorted(backends)) for op, backends in sorted(chosen.items())}
