"""Capture: a Hugging Face causal LM -> one FX GraphModule with dynamic batch and token dims.

torch.export (non-strict) traces the model's Python as it runs, so any model that runs eagerly
and has no data-dependent control flow captures; one that cannot fails here with the reason.
The graph takes (input_ids, position_ids) and returns logits; there is no KV cache inside it:
the runtime's cache pass adds paged attention later.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim
from torch.fx import GraphModule

from fxllm.passes.cleanup import normalize_graph
from fxllm.passes.graph_utils import count_ops

logger = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The model could not be captured into one graph; the message says why and where."""


class LogitsForward(torch.nn.Module):
    """Wraps a HF causal LM so its forward is (input_ids, position_ids) -> logits, cache off."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position."""
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


@dataclass
class CapturedGraph:
    """The captured forward and what passes need to know about it."""

    gm: GraphModule
    model_config: Any
    dtype: torch.dtype
    device: torch.device
    seconds: float
    ops_before: dict[str, int] = field(default_factory=dict)


def _model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype, param.device
    return torch.float32, torch.device("cpu")


def _plain_graph_module(gm: GraphModule) -> GraphModule:
    """Drop export's pytree calling convention so passes can add inputs; forward returns logits."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()
    output = graph.output_node()
    flat = output.args[0]
    if isinstance(flat, (tuple, list)):
        if len(flat) != 1:
            raise CaptureError(
                f"expected the captured forward to return logits only, got {len(flat)} outputs"
            )
        output.args = (flat[0],)
    # A plain GraphModule: export's stateful subclass checks the input spec (which passes extend)
    # and is not something torch.compile can trace.
    plain = GraphModule(gm, graph)
    # Inference only: with parameters requiring grad, AOTAutograd would trace a backward through
    # fxllm's custom ops, which have none.
    for param in plain.parameters():
        param.requires_grad_(False)
    return plain


def capture(model: torch.nn.Module) -> CapturedGraph:
    """Export `model` to one GraphModule with dynamic batch and token dimensions."""
    if not hasattr(model, "config"):
        raise CaptureError(f"{type(model).__name__} has no .config: fxllm captures Hugging Face causal LMs")
    model.eval()
    config = model.config
    dtype, device = _model_dtype_device(model)
    # Example sizes of 2 and 8 avoid export's specialisation of sizes 0 and 1.
    input_ids = torch.zeros(2, 8, dtype=torch.long, device=device)
    position_ids = torch.arange(8, device=device).expand(2, 8)
    # Dim.DYNAMIC rather than named ranges: on CUDA, kernel-selection code emits guards such as
    # min(128*T, 512*T) == 128*T that hold for every T but that export's range check cannot
    # prove. We check below that both dims stayed symbolic.
    dynamic = {
        "input_ids": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC},
        "position_ids": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC},
    }
    start = time.perf_counter()
    try:
        with torch.no_grad():
            exported = torch.export.export(
                LogitsForward(model), (input_ids, position_ids), dynamic_shapes=dynamic, strict=False
            )
    except Exception as exc:  # export raises many types; all mean "cannot capture"
        raise CaptureError(
            f"could not capture {type(model).__name__} into one graph: {type(exc).__name__}: {exc}"
        ) from exc
    first = next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name.startswith("input_ids"))
    if any(isinstance(size, int) for size in first.meta["val"].shape):
        raise CaptureError(
            f"capture specialised the batch or token dimension: {tuple(first.meta['val'].shape)}"
        )
    gm = _plain_graph_module(exported.module())
    normalize_graph(gm)
    seconds = time.perf_counter() - start
    logger.info("captured %s: %d nodes in %.1f s", type(model).__name__, len(gm.graph.nodes), seconds)
    return CapturedGraph(gm, config, dtype, device, seconds, count_ops(gm))
