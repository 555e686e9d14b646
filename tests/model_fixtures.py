"""Helpers for test fixtures that need a real model but not all of its depth."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from fxllm.models.loader import LoadedModel


def first_layers(loaded: LoadedModel, num_layers: int) -> LoadedModel:
    """A copy of `loaded` cut to its first `num_layers` decoder layers: the real weights, vocabulary and
    tokenizer, every kind of node in the graph, and capture, passes and compile time cut with the depth."""
    model = copy.deepcopy(loaded.model)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    return dataclasses.replace(loaded, model=model)


def save_hf_folder(loaded: LoadedModel, folder: Path) -> str:
    """Write `loaded` as a Hugging Face model folder (safetensors, config, tokenizer) and return its path: what
    `LLM(path)` and each tensor-parallel rank load in a second, where the embedded GGUF is de-quantized anew
    by every load."""
    loaded.model.save_pretrained(folder, safe_serialization=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    return str(folder)


def cast_parameters(loaded: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """A copy of `loaded` with its parameters in `dtype` and its buffers (RoPE's float32 inv_freq) as they
    are: parameter for parameter what `load_model(..., dtype=dtype)` gives, without another GGUF load."""
    model = copy.deepcopy(loaded.model)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.config.dtype = dtype
    return dataclasses.replace(loaded, model=model)
