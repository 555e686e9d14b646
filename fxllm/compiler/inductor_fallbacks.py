"""fxllm's custom ops registered with Inductor as explicit fallbacks before a graph is compiled.

Inductor runs an op it has no lowering for through an implicit fallback, and torch 2.11 (the GPU machines)
first formats every IR argument of that op into an info-log message, eagerly, even with the log off (2.13
formats lazily). The IR of an argument prints its producers recursively, exponentially in their depth: the
FP8 graph with the activation quantization fused into fxllm's norm and SiLU-and-mul kernels spent > 200 s in
that formatting on an H200 and never finished building (benchmarks/RESULTS.md, twelfth session). Registering
the same fallback (same layout constraint as Inductor's implicit path) before Inductor sees the graph skips
the message; what runs is unchanged: Inductor would have registered exactly this fallback itself.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule

logger = logging.getLogger(__name__)


def register_custom_op_fallbacks(gm: GraphModule) -> int:
    """Register fxllm ops of `gm` that Inductor has no lowering for as fallbacks; returns how many were new."""
    from torch._inductor import lowering

    if not (hasattr(lowering, "get_layout_constraint_tag") and hasattr(lowering, "tag_to_layout_constraint")):
        return 0  # an Inductor without the implicit path's helpers: leave the choice to it
    new = 0
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if not target.namespace.startswith("fxllm") or target in lowering.lowerings:
            continue
        # The constraint Inductor's implicit fallback picks for a custom op (graph.py, call_function).
        tag = lowering.get_layout_constraint_tag(target, with_default=True)
        lowering.make_fallback(target, layout_constraint=lowering.tag_to_layout_constraint(tag), warn=False)
        new += 1
    if new:
        logger.debug("Inductor: %d fxllm ops registered as fallbacks", new)
    return new
