"""Capture a Hugging Face model into one FX graph, run the pass pipeline, compile it."""

from __future__ import annotations

from typing import Any

# Lazy, like fxllm/__init__.py: `fxllm cache list` imports fxllm.compiler.cache, and an eager import of
# the API here would pull in fxllm.ops and torch._dynamo (~2.5 s) for a directory listing.
_EXPORTS = {
    "CompiledModel": "fxllm.compiler.api",
    "compile": "fxllm.compiler.api",
    "compile_model": "fxllm.compiler.api",
    "CapturedGraph": "fxllm.compiler.capture",
    "CaptureError": "fxllm.compiler.capture",
    "capture": "fxllm.compiler.capture",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxllm.compiler' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
