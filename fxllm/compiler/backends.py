"""Graph backends: how a transformed GraphModule becomes a callable (eager, inductor, ...)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.fx import GraphModule

logger = logging.getLogger(__name__)

GraphBackend = Callable[[GraphModule], Callable[..., object]]
_GRAPH_BACKENDS: dict[str, GraphBackend] = {}


def register_graph_backend(name: str) -> Callable[[GraphBackend], GraphBackend]:
    """Decorator: register a function that compiles a transformed GraphModule."""

    def decorate(fn: GraphBackend) -> GraphBackend:
        _GRAPH_BACKENDS[name] = fn
        return fn

    return decorate


def get_graph_backend(name: str) -> GraphBackend:
    """The graph backend `name`; a clear error lists the registered ones."""
    try:
        return _GRAPH_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown compile backend {name!r}; choose one of {sorted(_GRAPH_BACKENDS)}"
        ) from None


@register_graph_backend("eager")
def eager_backend(gm: GraphModule) -> Callable[..., object]:
    """Run the transformed graph as it is (debugging, and the fastest start-up)."""
    return gm


@register_graph_backend("inductor")
def inductor_backend(gm: GraphModule) -> Callable[..., object]:
    """Compile with Inductor; ops with a bound kernel stay opaque, reference-only ops are inlined."""
    from fxllm.compiler.inline_reference import inline_reference_ops
    from fxllm.passes.graph_utils import graph_device

    # On the CPU, freezing turns the weights into constants that Inductor pre-packs for oneDNN's
    # GEMMs: SmolLM2 decode went 160 -> 309 tok/s (float32, 16 requests) and 53 -> 87 (bfloat16,
    # batch 1) on the 2-core dev box. On CUDA it would only duplicate folded weights.
    # (torch.compile's `options` did not switch it on here, so the config is patched around calls;
    # compilation happens inside the first call.)
    inductor_patches = {"freezing": True} if graph_device(gm).type == "cpu" else {}
    compiled = torch.compile(inline_reference_ops(gm), backend="inductor", dynamic=True)

    def run(*args: object) -> object:
        # Size-oblivious reasoning: a batch of 1 sequence or 1 sampled token must not specialise
        # (and later recompile) the graph the way sizes 0 and 1 otherwise do.
        with (
            torch.fx.experimental._config.patch(backed_size_oblivious=True, use_duck_shape=False),
            torch._inductor.config.patch(inductor_patches),
        ):
            return compiled(*args)

    return run
