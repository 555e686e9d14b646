"""The pass registry: `register_pass`, stages, and the result every pass returns."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Stages run in this order; a pass belongs to exactly one. Passes a stage holds run in the
# order the built-in pipeline declares them, then user passes in registration order.
STAGES: tuple[str, ...] = (
    "cleanup",
    "match",
    "fuse",
    "quantize",
    "shard",
    "fuse_collectives",
    "cache",
    "finalize",
    "lower",  # device layouts (packed CPU weights), then each op node's implementation (lower_ops)
)


@dataclass
class PassContext:
    """What a pass may know about the graph it rewrites."""

    model_config: Any = None  # the Hugging Face PretrainedConfig, when capture had one
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    weights_are_attributes: bool = True  # False for Dynamo graphs, whose weights arrive as inputs
    options: dict[str, Any] = field(default_factory=dict)  # this pass's options from config.yml
    op_backends: dict[str, str] = field(default_factory=dict)  # compile.op_backends: op -> preferred backend
    kv_cache_dtype: str = "auto"  # cache.dtype: "auto" (the activations' dtype) or "fp8"
    # A checkpoint's KV cache scales, {attention layer: (k_scale, v_scale)} (fxllm/ops/kv_quant.py); else 1.0.
    kv_scales: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    # Tensor parallelism: the rank's TensorParallelInfo (fxllm/runtime/distributed/sharding.py); None = one rank.
    parallel: Any = None
    # quantization: the QuantizationConfig (fxllm/config.py); None or method "none" = no quantize passes.
    quantization: Any = None


@dataclass
class PassResult:
    """What one pass did: how many rewrites, and what it saw but could not handle."""

    num_matches: int = 0
    notes: list[str] = field(default_factory=list)
    changed: bool | None = None  # None: derived from num_matches

    @property
    def graph_changed(self) -> bool:
        """Whether the graph needs recompiling and re-propagating."""
        return self.num_matches > 0 if self.changed is None else self.changed


PassFn = Callable[[torch.fx.GraphModule, PassContext], PassResult]


@dataclass(frozen=True)
class PassSpec:
    """A registered pass."""

    name: str
    stage: str
    fn: PassFn
    needs_runtime: bool = False  # True for passes that add runtime inputs (KV cache, metadata)
    builtin: bool = False
    description: str = ""


_PASSES: dict[str, PassSpec] = {}


def register_pass(
    name: str, stage: str, *, needs_runtime: bool = False, description: str = "", _builtin: bool = False
) -> Callable[[PassFn], PassFn]:
    """Decorator: register `fn(gm, ctx) -> PassResult` as pass `name` in `stage`."""
    if stage not in STAGES:
        raise ValueError(f"unknown pass stage {stage!r}; stages are {', '.join(STAGES)}")

    def decorate(fn: PassFn) -> PassFn:
        if name in _PASSES and _PASSES[name].fn is not fn:
            raise ValueError(f"a pass named {name!r} is already registered; pick another name")
        text = description or next(iter((fn.__doc__ or "").strip().splitlines()), "")
        _PASSES[name] = PassSpec(name, stage, fn, needs_runtime, _builtin, text)
        return fn

    return decorate


def unregister_pass(name: str) -> None:
    """Remove a registered pass (tests and plugins that reload use this)."""
    _PASSES.pop(name, None)


def get_pass(name: str) -> PassSpec:
    """The registered pass called `name`; a clear error lists the known ones."""
    try:
        return _PASSES[name]
    except KeyError:
        raise ValueError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(_PASSES))}") from None


def registered_passes() -> list[PassSpec]:
    """Every registered pass, in registration order."""
    return list(_PASSES.values())
