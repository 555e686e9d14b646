"""Helpers for test fixtures that need a real model but not all of its depth."""

from __future__ import annotations

import copy
import dataclasses

from fxllm.models.loader import LoadedModel


def first_layers(loaded: LoadedModel, num_layers: int) -> LoadedModel:
    """A copy of `loaded` cut to its first `num_layers` decoder layers: the real weights, vocabulary and
    tokenizer, every kind of node in the graph, and capture, passes and compile time cut with the depth."""
    model = copy.deepcopy(loaded.model)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    return dataclasses.replace(loaded, model=model)
