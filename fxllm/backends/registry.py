"""Op backends: several implementations of one canonical op, chosen per device and config.

Every op's default implementation is its plain-torch reference ("torch"), which runs anywhere.
Faster ones (Triton on CUDA, later TensorRT or quantized GEMMs) register here with a capability
check; `bind_op_backends` installs the chosen one as the op's kernel for a device type through
torch.library, so compiled graphs call it with no Python dispatch of ours in between.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

REFERENCE = "torch"


@dataclass(frozen=True)
class NativeKernel:
    """A C++ kernel that registers itself with the dispatcher for one device type, so compiled graphs
    reach it without entering Python; `fn` is used where it cannot be installed."""

    device_type: str
    install: Callable[[], bool]  # False when it cannot (e.g. the library did not build)
    uninstall: Callable[[], None]


@dataclass(frozen=True)
class OpImplementation:
    """One implementation of a canonical op."""

    op: str  # canonical op name without namespace, e.g. "rms_norm"
    name: str  # backend name, e.g. "triton"
    fn: Callable[..., object]
    supports: Callable[[torch.device], bool]
    priority: int = 0  # higher wins when config does not choose
    native: NativeKernel | None = None


_IMPLS: dict[str, dict[str, OpImplementation]] = {}


def register_op_backend(
    op: str,
    name: str,
    fn: Callable[..., object],
    *,
    supports: Callable[[torch.device], bool] | None = None,
    priority: int = 0,
    native: NativeKernel | None = None,
) -> None:
    """Register `fn` as backend `name` of canonical op `op` (same signature as the op)."""
    if name == REFERENCE:
        raise ValueError(f"backend name {REFERENCE!r} is the built-in reference; pick another name")
    if not hasattr(torch.ops.fxllm, op):
        raise ValueError(f"unknown op fxllm::{op}; import fxllm.ops first or check the name")
    _IMPLS.setdefault(op, {})[name] = OpImplementation(
        op, name, fn, supports or (lambda _d: True), priority, native
    )


def op_backends(op: str) -> list[str]:
    """Names of every backend of `op`, the reference first."""
    return [REFERENCE, *sorted(_IMPLS.get(op, {}))]


def choose_backend(op: str, device: torch.device, preference: str | None = None) -> str:
    """The backend `op` uses on `device`: the configured one if it supports the device."""
    impls = _IMPLS.get(op, {})
    if preference is not None and preference != REFERENCE:
        if preference not in impls:
            raise ValueError(f"op {op}: unknown backend {preference!r}; available: {op_backends(op)}")
        if not impls[preference].supports(device):
            raise ValueError(
                f"op {op}: backend {preference!r} does not support {device}; choose one of {op_backends(op)} "
                "in config.yml under backends:"
            )
        return preference
    if preference == REFERENCE:
        return REFERENCE
    usable = [impl for impl in impls.values() if impl.supports(device)]
    return max(usable, key=lambda impl: impl.priority).name if usable else REFERENCE


def bind_op_backends(
    device: torch.device | str, preferences: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Install the chosen implementation of every op for `device`'s type; returns op -> backend."""
    import fxllm.ops  # noqa: F401  (the ops must exist before kernels are registered for them)

    device = torch.device(device)
    if device.type == "cpu":
        from fxllm.backends import cpu  # noqa: F401  (registers the C++ CPU kernels)
    elif device.type == "cuda":
        from fxllm.backends import triton  # noqa: F401  (registers the Triton kernels when triton is present)
    preferences = dict(preferences or {})
    unknown = sorted(set(preferences) - set(_IMPLS) - _known_ops())
    if unknown:
        raise ValueError(f"backends: unknown ops {unknown}; known ops: {sorted(_known_ops())}")
    chosen: dict[str, str] = {}
    for op in sorted(_known_ops()):
        name = choose_backend(op, device, preferences.get(op))
        chosen[op] = name
        for impl in _IMPLS.get(op, {}).values():  # an earlier binding's C++ kernel must not shadow this one
            if impl.native is not None and impl.native.device_type == device.type:
                impl.native.uninstall()
        if name == REFERENCE:
            continue
        impl = _IMPLS[op][name]
        if impl.native is not None and impl.native.device_type == device.type and impl.native.install():
            continue
        torch.library.register_kernel(f"fxllm::{op}", device.type, impl.fn)
    logger.info("op backends for %s: %s", device, ", ".join(f"{k}={v}" for k, v in chosen.items()))
    return chosen


def _known_ops() -> set[str]:
    return {
        "attention",
        "paged_attention",
        "rms_norm",
        "fused_add_rms_norm",
        "rotary_embedding",
        "silu_and_mul",
        "gelu_and_mul",
        "packed_linear",
    }
