"""The canonical op registry: every `fxllm::` op the passes emit, with its plain-torch reference.

An op registers here next to its definition. The lowering pass (fxllm/passes/lower_ops.py) reads
this table: a node whose chosen implementation is the reference is either inlined (its reference
traced into ATen ops that Inductor fuses with their neighbours) or, where the reference cannot be
traced (data-dependent loops, in-place cache writes), kept opaque as `fxllm_torch::<op>`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NAMESPACE = "fxllm"


@dataclass(frozen=True)
class CanonicalOp:
    """One canonical op: its name in the `fxllm` namespace and how its reference runs."""

    name: str
    reference: Callable[..., object]  # same signature as the op; traceable when `inline`
    inline: bool  # True: lowering traces the reference into the graph; False: an opaque op

    @property
    def traceable_reference(self) -> Callable[..., object]:
        """The reference without `eager_only`, so tracing enters it."""
        return getattr(self.reference, "__wrapped__", self.reference)

    @property
    def overload(self) -> torch._ops.OpOverload:
        """`torch.ops.fxllm.<name>.default`."""
        return getattr(torch.ops.fxllm, self.name).default


_CANONICAL: dict[str, CanonicalOp] = {}


def register_canonical_op(name: str, reference: Callable[..., object], *, inline: bool) -> None:
    """Declare `fxllm::<name>` (already defined through torch.library) as an op the lowering handles."""
    if not hasattr(torch.ops.fxllm, name):
        raise ValueError(f"define fxllm::{name} with torch.library before registering it as a canonical op")
    _CANONICAL[name] = CanonicalOp(name, reference, inline)


def canonical_ops() -> dict[str, CanonicalOp]:
    """Every registered canonical op by name (importing fxllm.ops registers the built-in ones)."""
    import fxllm.ops  # noqa: F401

    return dict(_CANONICAL)


def canonical_op_of(target: object) -> CanonicalOp | None:
    """The canonical op whose default overload is `target`, if any."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != NAMESPACE:
        return None
    return canonical_ops().get(target._schema.name.split("::", 1)[1])
