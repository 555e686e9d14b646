"""FP8 through the engine and the CLI: LLM(overrides=["quantization.method=fp8"]) on tiny-llama, greedy
tokens vs the float model, the compile cache (FP8 and float never share an entry; a warm start rebuilds
the e4m3 weights from the model and generates the cold start's tokens), `fxllm compile --explain`.

The engine's FP8 greedy tokens equal HF generate on the same model with each linear replaced by
fp8_linear_reference (same arithmetic). Against the float model, random tiny-llama logits are too flat
(top-2 gaps of a few 1e-2 vs FP8's ~5-15% RMS change) for token agreement to mean anything: not compared.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.quantization.fp8 import FP8_DTYPE
from fxllm.runtime.sampling_params import SamplingParams

_gen = torch.Generator().manual_seed(5)
PROMPTS = [torch.randint(3, 512, (n,), generator=_gen).tolist() for n in (7, 19, 30)]
NEW = 8
GREEDY = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0)
BASE = ["compile.backend=eager", "cache.num_blocks=32"]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return load_model("tiny-llama").model


def _tokens(llm: LLM) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)]


def test_fp8_engine_equals_hf_greedy_on_the_fp8_model(
    tiny: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_fp8_linear import fp8_reference_model

    monkeypatch.setenv("FXLLM_NO_COMPILE_CACHE", "1")
    fp8 = LLM(copy.deepcopy(tiny), config=load_config(None, [*BASE, "quantization.method=fp8"]))
    gm = fp8.engine.runner.graph_module
    assert sum(p.dtype == FP8_DTYPE for p in gm.parameters()) == 8  # merged qkv, o, gate_up, down x 2
    assert not any("proj" in name for name, _ in gm.named_parameters())  # no float copy in the graph
    reference = fp8_reference_model(tiny).eval()
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = reference.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            expected.append(out[0, len(prompt) :].tolist())
    assert _tokens(fp8) == expected


def test_fp8_compile_cache_key_and_warm_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: torch.nn.Module
) -> None:
    from fxllm.backends.cpu import native
    from fxllm.compiler.cache_build import start_key

    native.available()  # loaded from the usual place, not rebuilt under the temporary root
    keys = {}
    for method in ("none", "fp8"):
        config = load_config(None, [f"quantization.method={method}"])
        key, parts, _ = start_key(config, tiny, "tiny-llama", torch.device("cpu"), torch.float32)
        keys[method] = (key, parts["quantization"])
    assert (
        keys["none"][0] != keys["fp8"][0]
        and keys["none"][1] == "none"
        and '"method": "fp8"' in keys["fp8"][1]
    )
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(tmp_path / "fxllm-cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)
    overrides = [*BASE, "quantization.method=fp8"]
    cold = LLM(copy.deepcopy(tiny), config=load_config(None, overrides))
    warm = LLM(copy.deepcopy(tiny), config=load_config(None, overrides))
    assert cold.build_info.compile_cache.startswith("miss") and warm.build_info.compile_cache == "hit"
    cold_w = dict(cold.engine.runner.graph_module.named_parameters())
    warm_w = dict(warm.engine.runner.graph_module.named_parameters())
    fp8_names = [n for n, p in cold_w.items() if p.dtype == FP8_DTYPE]
    assert len(fp8_names) == 8
    for name in fp8_names:  # rebuilt from the model's float weights by the recorded recipe, bit for bit
        assert torch.equal(cold_w[name].view(torch.uint8), warm_w[name].view(torch.uint8))
    assert _tokens(warm) == _tokens(cold)
    other = LLM(copy.deepcopy(tiny), config=load_config(None, BASE))  # float: another entry
    assert other.build_info.compile_cache.startswith("miss")


def test_compile_explain_lists_the_fp8_gemms() -> None:
    from fxllm.serve.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["compile", "tiny-llama", "--explain", "--backend", "eager",
                     "--set", "quantization.method=fp8"]) == 0  # fmt: skip
    text = out.getvalue()
    assert "fp8_gemm -> inlined" in text  # the CPU's implementation: the reference, traced
    assert "8 activation quantization(s) in aten" in text  # in front of each GEMM, for Inductor to fuse
    per_node = [line for line in text.splitlines() if line.strip().startswith("fp8_gemm_default")]
    assert len(per_node) == 8  # one row per FP8 GEMM in the per-node table
    assert "1 linear(s) kept in torch.float32 by exclude 'lm_head'" in text
