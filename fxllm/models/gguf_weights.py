"""A weights-only model for a warm GGUF start: the tensors, config and generation config of the HF model a
GGUF cache entry describes, without transformers' model classes.

A start whose post-pass graph is in the compile cache never runs the HF forward: it binds the graph to the
model's tensors by name and reads the config. Importing the model classes costs seconds on the 2-core box
(transformers' modeling_utils, its losses and scipy.optimize through them, accelerate) and building the
module more; this module holds the same tensors under the same names, in the same order, tied the same way,
so the compile cache's key is the same as the real model's (`fxllm_model_class` names the real class). A
start that misses the compile cache calls `fxllm_materialize()` for the real model, built around these
tensors (no second de-quantization). Every entry is checked at write time: this model's tensors, names,
order and ties equal the cold load's, or the entry is not kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxllm.models.gguf_cache import BadEntry, Entry

BUFFERS_FILE = "buffers.safetensors"  # the model's buffers (rotary tables): computed by the model class


def model_layout(model: nn.Module) -> list[dict[str, Any]]:
    """Every parameter then every buffer of `model`, ties under every name: name, kind, the first name of
    its tensor when tied, and whether a buffer is persistent."""
    layout: list[dict[str, Any]] = []
    first: dict[int, str] = {}
    non_persistent = {
        f"{prefix}.{leaf}" if prefix else leaf
        for prefix, module in model.named_modules(remove_duplicate=False)
        for leaf in module._non_persistent_buffers_set
    }
    for kind, named in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):  # fmt: skip
        for name, tensor in named:
            layout.append({"name": name, "kind": kind, "tied_to": first.get(id(tensor)),
                           "persistent": name not in non_persistent})  # fmt: skip
            first.setdefault(id(tensor), name)
    return layout


def model_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers to store with the entry (one per tied group), contiguous on CPU."""
    seen: set[int] = set()
    out = {}
    for name, buf in model.named_buffers(remove_duplicate=False):
        if id(buf) not in seen:
            seen.add(id(buf))
            out[name] = buf.detach().cpu().contiguous()
    return out


def model_class_name(model: nn.Module) -> str:
    """The class the compile cache's key names: the real one, also for a weights-only model."""
    return getattr(model, "fxllm_model_class", None) or f"{type(model).__module__}.{type(model).__qualname__}"


class WeightsOnlyModel(nn.Module):
    """The tensors of an HF causal LM under their names, its `config` and `generation_config`; no forward."""

    def __init__(self, entry: Entry, dtype: torch.dtype, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import load_file
        from transformers.generation.configuration_utils import GenerationConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        super().__init__()
        data = entry.data
        self.config = CONFIG_MAPPING[data["config"]["model_type"]].from_dict(data["config"])
        self.config._attn_implementation = data["attn_implementation"]
        self.generation_config = (
            GenerationConfig.from_dict(data["generation_config"])
            if data["generation_config"] is not None
            else None
        )
        self.fxllm_model_class = data["model_class"]
        self._entry, self._dtype = entry, dtype
        buffers = load_file(str(entry.path / BUFFERS_FILE))
        # A tied tensor's recipe may be under any of its names (transformers maps the GGUF tensor to one).
        names_of: dict[str, list[str]] = {}
        for item in data["layout"]:
            names_of.setdefault(item["tied_to"] or item["name"], []).append(item["name"])
        made: dict[str, torch.Tensor] = {}
        for item in data["layout"]:
            name = item["name"]
            prefix, _, leaf = name.rpartition(".")
            module = self._submodule(prefix)
            if item["tied_to"] is not None:
                tensor = made[item["tied_to"]]
            elif item["kind"] == "p":
                source = next((n for n in names_of[name] if n in tensors), None)
                if source is None:
                    raise BadEntry(f"parameter {name} has no recipe")
                # As the real load assigns it (safetensors_loader._assign): cast to dtype, no grad.
                tensor = nn.Parameter(tensors[source].to(dtype), requires_grad=False)
            else:
                tensor = buffers[name]
            made[name] = tensor
            if item["kind"] == "p":
                module.register_parameter(leaf, tensor)  # type: ignore[arg-type]
            else:
                module.register_buffer(leaf, tensor, persistent=item["persistent"])
        self.eval()

    def _submodule(self, prefix: str) -> nn.Module:
        module: nn.Module = self
        for part in prefix.split(".") if prefix else []:
            child = module._modules.get(part)
            if child is None:
                child = nn.Module()
                module.add_module(part, child)
            module = child
        return module

    def fxllm_materialize(self) -> nn.Module:
        """The real HF model around these tensors (for capture, when the compile cache misses)."""
        from fxllm.models.gguf_fastload import build_model

        params = dict(self.named_parameters(remove_duplicate=False))
        model = build_model(self._entry, self._dtype, params)
        device = next(iter(params.values())).device
        return model.to(device)


def weights_only_model(entry: Entry, path: Path, dtype: torch.dtype) -> WeightsOnlyModel:
    """The weights-only model of `path`'s entry (CPU)."""
    from fxllm.models.gguf_fastload import read_tensors

    return WeightsOnlyModel(entry, dtype, read_tensors(path, entry.data["tensors"]))
