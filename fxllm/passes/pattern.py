"""`PatternPass`: declarative search/replace passes on torch._inductor's pattern matcher.

Patterns are traced the way capture traces models (make_fx at the pre-dispatch ATen level, then
the same cleanup), so a pattern written as plain PyTorch matches what a Hugging Face module
produces. Integers in a pattern match any value (shapes differ per model); floats that must be
read off the match (eps, scales) go in `scalars`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import GraphModule
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from fxllm.passes.cleanup import normalize_graph
from fxllm.passes.graph_utils import recompile, value_signature
from fxllm.passes.registry import PassContext, PassResult, register_pass

if TYPE_CHECKING:  # Inductor's matcher is imported when a pass first runs: a warm start runs none
    from torch._inductor.pattern_matcher import Match, PatternMatcherPass

logger = logging.getLogger(__name__)

PATTERN_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


# Inductor's matcher traces twice per match: the search function again on the match's own shapes (to
# check what the pattern's wildcard integers stood for), then the replacement. A model's layers repeat
# the same shapes, so while a pass applies, a trace is made once per distinct function and argument
# signature: SmolLM2's 120 matches needed 242 traces, now a handful.
_trace_memo: ContextVar[dict[Any, GraphModule] | None] = ContextVar("fxllm_pattern_trace_memo", default=None)
TRACE_COUNTS = {"traced": 0, "reused": 0}  # for tests and the pass report


def _function_key(fn: Callable[..., Any]) -> Any:
    """A function's code and what its closure holds: Inductor wraps the search function in a fresh closure
    per match (over the match's argument list, of which only the length is read)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ("object", id(fn))
    cells = []
    for cell in fn.__closure__ or ():
        value = cell.cell_contents
        if callable(value):
            cells.append(("callable", id(value)))
        elif isinstance(value, (list, tuple)):
            cells.append(("sequence", len(value)))
        else:
            cells.append(("value", value_signature(value)))
    return (code, tuple(cells))


def _copy(gm: GraphModule) -> GraphModule:
    """A fresh GraphModule over a copy of `gm`'s graph (callers rename placeholders and edit meta). Its
    Python code is generated only if something calls or reads it: the matcher reads the graph only, and
    generating the code of SmolLM2's 242 pattern copies was a fifth of its pass time."""
    graph = torch.fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return _LazyGraphModule(gm, graph)


def trace_pattern(fn: Callable[..., Any], args: Sequence[Any], **_: Any) -> GraphModule:
    """Trace a pattern function into the IR that capture produces (once per signature while a pass applies)."""
    memo = _trace_memo.get()
    key = None
    if memo is not None:
        try:
            key = (_function_key(fn), value_signature(list(args)))
        except TypeError:
            key = None
        if key is not None and key in memo:
            TRACE_COUNTS["reused"] += 1
            return _copy(memo[key])
    TRACE_COUNTS["traced"] += 1
    gm = make_fx(fn, pre_dispatch=True)(*args)
    normalize_graph(gm)
    if memo is not None and key is not None:
        memo[key] = gm
        return _copy(gm)
    return gm


@dataclass
class Rewrite:
    """One search/replace pair. `make_inputs(dtype)` returns example inputs for tracing; `anchors` are ATen
    ops (packets) the search pattern calls: a graph lacking one cannot match, so the rewrite is skipped there
    without tracing its pattern."""

    search: Callable[..., Any]
    replace: Callable[..., Any]
    make_inputs: Callable[[torch.dtype], list[Any]]
    scalars: dict[str, float] = field(default_factory=dict)
    extra_check: Callable[[Match], bool] | None = None
    anchors: tuple[Any, ...] = ()


class PatternPass:
    """A pass made of `Rewrite`s, registered by name; matches count as the pass's matches."""

    def __init__(
        self, name: str, stage: str, rewrites: Sequence[Rewrite], description: str = "", builtin: bool = False
    ) -> None:
        self.name = name
        self.rewrites = list(rewrites)
        # Built once per process for each dtype and set of rewrites whose anchors a graph has.
        self._matchers: dict[tuple[torch.dtype, tuple[int, ...]], PatternMatcherPass] = {}
        register_pass(name, stage, description=description or f"pattern pass {name}", _builtin=builtin)(self)

    def _matcher(self, dtype: torch.dtype, active: tuple[int, ...]) -> PatternMatcherPass:
        # Patterns are traced lazily per dtype: a float32 graph has no casts to float32 left,
        # a bfloat16 one does, so the two need different patterns.
        key = (dtype, active)
        if key not in self._matchers:
            from torch._inductor.pattern_matcher import PatternMatcherPass, register_replacement

            matcher = PatternMatcherPass(pass_name=self.name)
            for index in active:
                rewrite = self.rewrites[index]
                kwargs: dict[str, Any] = {"scalar_workaround": dict(rewrite.scalars)}
                if rewrite.extra_check is not None:
                    kwargs["extra_check"] = rewrite.extra_check
                register_replacement(
                    rewrite.search,
                    rewrite.replace,
                    rewrite.make_inputs(dtype),
                    trace_pattern,
                    matcher,
                    **kwargs,
                )
            for entries in matcher.patterns.values():
                for entry in entries:
                    _keep_module_stack(entry)
            self._matchers[key] = matcher
        return self._matchers[key]

    def active_rewrites(self, gm: GraphModule) -> tuple[int, ...]:
        """Indices of the rewrites whose anchor ops all occur in `gm` (one walk over the graph)."""
        ops = {
            getattr(n.target, "overloadpacket", n.target) for n in gm.graph.nodes if n.op == "call_function"
        }
        return tuple(i for i, r in enumerate(self.rewrites) if all(op in ops for op in r.anchors))

    def __call__(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        """Apply every rewrite until none matches."""
        active = self.active_rewrites(gm)
        if not active:
            return PassResult(notes=["skipped: the graph has none of the patterns' anchor ops"])
        total = 0
        for dtype in _graph_float_dtypes(gm, ctx):
            matcher = self._matcher(dtype, active)
            token = _trace_memo.set({})  # the memo's symbolic sizes belong to this graph's fake mode
            try:
                total += matcher.apply(gm.graph)
            finally:
                _trace_memo.reset(token)
        if total:
            gm.graph.eliminate_dead_code()
            recompile(gm)
        return PassResult(num_matches=total)


def _keep_module_stack(entry: Any) -> None:
    """Make `entry`'s replacement nodes carry the matched node's nn_module_stack where they have none.

    Passes find layers by module path (expose_hidden_states: `layers.<i>.input_layernorm`). torch 2.13's
    matcher copies the stack onto replacements; torch 2.11's (the GPU machines') does not, and EAGLE-3's
    hidden-state pass then found no layer norms there."""
    apply = entry.apply

    def apply_keeping_stack(match: Match, graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        stack = node.meta.get("nn_module_stack")
        before = set(graph.nodes) if stack else None
        apply(match, graph, node)
        if before is not None:
            for new in graph.nodes:
                if new not in before and not new.meta.get("nn_module_stack"):
                    new.meta["nn_module_stack"] = stack

    entry.apply = apply_keeping_stack


def _graph_float_dtypes(gm: GraphModule, ctx: PassContext) -> list[torch.dtype]:
    seen: list[torch.dtype] = [ctx.dtype] if ctx.dtype in PATTERN_DTYPES else []
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dtype in PATTERN_DTYPES and value.dtype not in seen:
            seen.append(value.dtype)
    return seen
