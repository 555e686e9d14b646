"""Model registry: the "config, swap submodules, load weights" extension point for custom models."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# Factory gets the module being replaced (still on the meta device when called before weights are
# loaded, i.e. for presets and HF folders; real for GGUF) and the model config, returns its replacement.
SubmoduleFactory = Callable[[nn.Module, PretrainedConfig], nn.Module]


@dataclass
class ModelSpec:
    """How fxllm loads one architecture: config fixups, submodule swaps, checkpoint key renames."""

    name: str
    architectures: list[str]
    # Edits the raw config dict (as in config.json) before the config object is built, so a custom
    # model_type can be mapped onto a transformers architecture.
    config_fixups: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    submodule_swaps: dict[str, SubmoduleFactory] = field(default_factory=dict)
    # Checkpoint tensor name -> model parameter name (HF-folder loads only).
    weight_mapping: Callable[[str], str] | None = None


_REGISTRY: dict[str, ModelSpec] = {}
_LOCK = threading.Lock()


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Register `spec` for each of its architectures; returns it so it can be used as a decorator value."""
    if not spec.architectures:
        raise ValueError(
            f"ModelSpec {spec.name!r} lists no architectures (HF class names like 'LlamaForCausalLM')"
        )
    with _LOCK:
        for arch in spec.architectures:
            old = _REGISTRY.get(arch)
            if old is not None and old is not spec and not replace:
                raise ValueError(
                    f"architecture {arch!r} already registered by ModelSpec {old.name!r}; "
                    "pass replace=True to override it"
                )
        for arch in spec.architectures:
            _REGISTRY[arch] = spec
    logger.info("registered model spec %r for %s", spec.name, ", ".join(spec.architectures))
    return spec


def unregister_model(name: str) -> None:
    """Remove every registration made by the spec called `name` (no-op if absent)."""
    with _LOCK:
        for arch in [a for a, s in _REGISTRY.items() if s.name == name]:
            del _REGISTRY[arch]


def get_model_spec(architecture: str) -> ModelSpec | None:
    """The spec registered for HF class name `architecture`, or None."""
    with _LOCK:
        return _REGISTRY.get(architecture)


def find_model_spec(architectures: Iterable[str] | None) -> ModelSpec | None:
    """First registered spec among `architectures` (e.g. `config.architectures`), or None."""
    for arch in architectures or ():
        spec = get_model_spec(arch)
        if spec is not None:
            return spec
    return None


def apply_config_fixups(config_dict: dict[str, Any], spec: ModelSpec | None) -> dict[str, Any]:
    """Run the spec's config fixups on a raw config dict (returns it unchanged without fixups)."""
    if spec is None or spec.config_fixups is None:
        return config_dict
    fixed = spec.config_fixups(dict(config_dict))
    if not isinstance(fixed, dict):
        raise TypeError(
            f"ModelSpec {spec.name!r}: config_fixups must return a dict, got {type(fixed).__name__}"
        )
    return fixed


def apply_model_spec(model: nn.Module, spec: ModelSpec | None) -> int:
    """Swap submodules of `model` per `spec.submodule_swaps`; returns how many were replaced."""
    if spec is None or not spec.submodule_swaps:
        return 0
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError("apply_model_spec needs a transformers model with a .config")
    # Collect first: replacing while iterating named_modules would visit the new modules too.
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and type(module).__name__ in spec.submodule_swaps
    ]
    swapped: list[str] = []
    for name, module in targets:
        # A module inside an already-replaced one is gone from the model; its swap is the factory's job.
        if any(name.startswith(prefix + ".") for prefix in swapped):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement = spec.submodule_swaps[type(module).__name__](module, config)
        if not isinstance(replacement, nn.Module):
            raise TypeError(
                f"ModelSpec {spec.name!r}: factory for {type(module).__name__} returned "
                f"{type(replacement).__name__}, expected an nn.Module"
            )
        setattr(parent, leaf, replacement)
        swapped.append(name)
    logger.info("model spec %r swapped %d submodule(s)", spec.name, len(swapped))
    return len(swapped)
