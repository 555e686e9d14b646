"""Inline the plain-torch reference of fxllm ops that have no faster kernel on the device.

An op bound to its reference is a sequence of small ATen ops (RMSNorm is eight). Left opaque, the
compiled graph calls it through Python and runs those ops one by one; inlined, Inductor fuses
them with their neighbours into one loop (on the CPU, one C++ kernel). Ops with a real kernel
(Triton on CUDA) and paged attention (it writes the KV cache) stay opaque.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from fxllm.backends.registry import REFERENCE, choose_backend
from fxllm.passes.graph_utils import fake_mode_of, graph_device, val

logger = logging.getLogger(__name__)


def _references() -> dict[str, Callable[..., Any]]:
    import torch.nn.functional as F

    from fxllm.ops.linear import packed_linear_reference
    from fxllm.ops.norms import rms_norm_reference
    from fxllm.ops.rotary import rotary_embedding_reference

    # __wrapped__: the undecorated functions, so make_fx traces into them.
    rms = rms_norm_reference.__wrapped__  # type: ignore[attr-defined]

    def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> Any:
        summed = x + residual
        return rms(summed, weight, eps), summed

    return {
        "rms_norm": rms,
        "fused_add_rms_norm": fused_add_rms_norm,
        "rotary_embedding": rotary_embedding_reference.__wrapped__,  # type: ignore[attr-defined]
        "silu_and_mul": lambda gate, up: F.silu(gate) * up,
        "gelu_and_mul": lambda gate, up, approximate="none": F.gelu(gate, approximate=approximate) * up,
        "packed_linear": packed_linear_reference.__wrapped__,  # type: ignore[attr-defined]
    }


def inline_reference_ops(gm: GraphModule) -> GraphModule:
    """Return `gm` re-traced with reference-bound fxllm ops decomposed (or `gm` if none apply)."""
    device = graph_device(gm)
    table = {
        getattr(torch.ops.fxllm, op).default: fn
        for op, fn in _references().items()
        if choose_backend(op, device) == REFERENCE
    }
    present = {n.target for n in gm.graph.nodes if n.op == "call_function"} & set(table)
    mode = fake_mode_of(gm)
    if not present or mode is None:
        return gm
    inputs = [val(n) for n in gm.graph.nodes if n.op == "placeholder"]
    with mode, mode.shape_env.ignore_fresh_unbacked_symbols() if mode.shape_env else contextlib.nullcontext():
        traced = make_fx(gm, decomposition_table=table, tracing_mode="fake", pre_dispatch=True)(*inputs)
    logger.debug("inlined reference ops for %s: %s", device, sorted(str(t) for t in present))
    return traced
