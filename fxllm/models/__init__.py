"""Model loading (HF folder, safetensors, GGUF), the model registry, presets."""

from __future__ import annotations

from fxllm.models.embedded import embedded_gguf_path
from fxllm.models.loader import LoadedModel, load_model, resolve_dtype
from fxllm.models.presets import list_presets, preset_config
from fxllm.models.registry import (
    ModelSpec,
    apply_model_spec,
    get_model_spec,
    register_model,
    unregister_model,
)

__all__ = [
    "LoadedModel",
    "ModelSpec",
    "apply_model_spec",
    "embedded_gguf_path",
    "get_model_spec",
    "list_presets",
    "load_model",
    "preset_config",
    "register_model",
    "resolve_dtype",
    "unregister_model",
]
