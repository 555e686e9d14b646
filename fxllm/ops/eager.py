"""`eager_only`: keep torch.compile out of the ops' Python implementations."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])


def eager_only(fn: F) -> F:
    """Run `fn` eagerly even when called from inside a compiled graph.

    A compiled graph calls a custom op's Python implementation as an opaque kernel; without this,
    Dynamo's frame hook would try to compile the implementation's own frames (and fail on
    helpers such as torch.einsum's Python wrapper).
    """
    return torch.compiler.disable(fn, recursive=True)  # type: ignore[return-value]
