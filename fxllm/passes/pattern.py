"""`PatternPass`: declarative search/replace passes on torch._inductor's pattern matcher.

Patterns are traced the way capture traces models (make_fx at the pre-dispatch ATen level, then
the same cleanup), so a pattern written as plain PyTorch matches what a Hugging Face module
produces. Integers in a pattern match any value (shapes differ per model); floats that must be
read off the match (eps, scales) go in `scalars`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, register_replacement
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from fxllm.passes.cleanup import normalize_graph
from fxllm.passes.registry import PassContext, PassResult, register_pass

logger = logging.getLogger(__name__)

PATTERN_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def trace_pattern(fn: Callable[..., Any], args: Sequence[Any], **_: Any) -> GraphModule:
    """Trace a pattern function into the IR that capture produces."""
    gm = make_fx(fn, pre_dispatch=True)(*args)
    normalize_graph(gm)
    return gm


@dataclass
class Rewrite:
    """One search/replace pair. `make_inputs(dtype)` returns example inputs for tracing."""

    search: Callable[..., Any]
    replace: Callable[..., Any]
    make_inputs: Callable[[torch.dtype], list[Any]]
    scalars: dict[str, float] = field(default_factory=dict)
    extra_check: Callable[[Match], bool] | None = None


class PatternPass:
    """A pass made of `Rewrite`s, registered by name; matches count as the pass's matches."""

    def __init__(
        self, name: str, stage: str, rewrites: Sequence[Rewrite], description: str = "", builtin: bool = False
    ) -> None:
        self.name = name
        self.rewrites = list(rewrites)
        self._matchers: dict[torch.dtype, PatternMatcherPass] = {}
        register_pass(name, stage, description=description or f"pattern pass {name}", _builtin=builtin)(self)

    def _matcher(self, dtype: torch.dtype) -> PatternMatcherPass:
        # Patterns are traced lazily per dtype: a float32 graph has no casts to float32 left,
        # a bfloat16 one does, so the two need different patterns.
        if dtype not in self._matchers:
            matcher = PatternMatcherPass(pass_name=self.name)
            for rewrite in self.rewrites:
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
            self._matchers[dtype] = matcher
        return self._matchers[dtype]

    def __call__(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        """Apply every rewrite until none matches."""
        total = 0
        for dtype in _graph_float_dtypes(gm, ctx):
            total += self._matcher(dtype).apply(gm.graph)
        if total:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(num_matches=total)


def _graph_float_dtypes(gm: GraphModule, ctx: PassContext) -> list[torch.dtype]:
    seen: list[torch.dtype] = [ctx.dtype] if ctx.dtype in PATTERN_DTYPES else []
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dtype in PATTERN_DTYPES and value.dtype not in seen:
            seen.append(value.dtype)
    return seen
