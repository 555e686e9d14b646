"""benchmarks/roofline.py: the parameter count behind the GPU benchmarks' roofline fractions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fxllm.models.presets import preset_config

# benchmarks/ is not a package: load the module from its file (registered first: its dataclass looks it up).
_SPEC = importlib.util.spec_from_file_location(
    "benchmarks_roofline", Path(__file__).resolve().parents[1] / "benchmarks" / "roofline.py"
)
assert _SPEC is not None and _SPEC.loader is not None
roofline = sys.modules["benchmarks_roofline"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(roofline)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"])
def test_decoder_linear_params_counts_the_models_linear_weights(preset: str) -> None:
    """The count from the config equals the nn.Linear weights of the model built from it (GQA, head_dim
    set apart from hidden / heads, tied or untied heads alike: the LM head is read either way)."""
    config = preset_config(preset)
    model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert roofline.decoder_linear_params(config) == linear


def test_llama_8b_ideal_matches_the_issue_numbers() -> None:
    """The 8B preset's ideal on an H200 (the figure RESULTS.md divides by): 3,045 output tok/s at
    256 x 2,048/128, 15,905 at 128 x 128/2,048, with up to 1,024 sequences a step."""
    config = preset_config("llama-3.1-8b")
    shape = roofline.ModelShape.from_hf_config(config, roofline.decoder_linear_params(config))
    long_prompts = roofline.ideal_seconds(shape, 256, 2048, 128, 1024, "NVIDIA H200")
    long_outputs = roofline.ideal_seconds(shape, 128, 128, 2048, 1024, "NVIDIA H200")
    assert long_prompts is not None and long_outputs is not None
    assert long_prompts["out_tok_s"] == pytest.approx(3045.3, abs=0.1)
    assert long_outputs["out_tok_s"] == pytest.approx(15905.1, abs=0.1)
    assert roofline.ideal_seconds(shape, 1, 1, 1, 1, "a card not in the table") is None
