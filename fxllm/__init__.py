"""fxllm: a PyTorch-native LLM inference compiler and server."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imports are lazy so that `import fxllm` (and the torch.compile backend entry point) stays cheap.
_EXPORTS = {
    "compile": ("fxllm.compiler.api", "compile"),
    "CompiledModel": ("fxllm.compiler.api", "CompiledModel"),
    "LLM": ("fxllm.llm", "LLM"),
    "SamplingParams": ("fxllm.runtime.sampling_params", "SamplingParams"),
    "RequestOutputKind": ("fxllm.runtime.sampling_params", "RequestOutputKind"),
    "RequestOutput": ("fxllm.runtime.outputs", "RequestOutput"),
    "register_pass": ("fxllm.passes.registry", "register_pass"),
    "PassContext": ("fxllm.passes.registry", "PassContext"),
    "PassResult": ("fxllm.passes.registry", "PassResult"),
    "PatternPass": ("fxllm.passes.pattern", "PatternPass"),
    "Rewrite": ("fxllm.passes.pattern", "Rewrite"),
    "register_op_backend": ("fxllm.backends.registry", "register_op_backend"),
    "register_model": ("fxllm.models.registry", "register_model"),
    "register_scheduler": ("fxllm.runtime.scheduler", "register_scheduler"),
    "CapacityScheduler": ("fxllm.runtime.scheduler", "CapacityScheduler"),
    "load_config": ("fxllm.config", "load_config"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxllm' has no attribute {name!r}")
    import importlib

    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
