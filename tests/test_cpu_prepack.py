"""fxllm_cpu::onednn_linear: CPU linears over oneDNN-packed weights, chosen by the lowering, instead of Inductor's
weight freezing, so the compiled graph stays cacheable (issue 13).

On a CPU where fxllm's own packed kernel (AVX-512) takes the float32 linears, pack_linears hands none to
fxllm::linear and the graph-level tests skip; the op's own tests run wherever oneDNN packs float32."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cache_roots import usual_compiled_code_dirs
from tied_lm import TiedLM

from fxllm.backends.cpu import linear as cpu_linear
from fxllm.backends.cpu import onednn_linear
from fxllm.backends.cpu.onednn_linear import num_packed, packable
from fxllm.compiler.backends import cpu_freezing

pytestmark = pytest.mark.skipif(
    not packable(torch.float32), reason="oneDNN does not pack float32 weights here"
)
needs_handover = pytest.mark.skipif(
    cpu_linear.available(torch.float32), reason="fxllm's AVX-512 packed kernel takes the float32 linears here"
)

REPO = Path(__file__).resolve().parents[1]


def _op() -> torch._ops.OpOverload:
    from fxllm.backends.cpu import native

    op = native.op("onednn_linear")
    if op is None:
        pytest.skip("fxllm's C++ CPU kernels did not build here")
    return op


def test_schema_is_the_canonical_linear_s() -> None:
    # The lowering swaps a node's target and nothing else: the arguments must mean the same.
    canonical = str(torch.ops.fxllm.linear.default._schema)
    assert str(_op()._schema) == canonical.replace("fxllm::linear", "fxllm_cpu::onednn_linear", 1)


@pytest.mark.parametrize("case", ["2d", "3d", "strided", "bias", "empty"])
def test_op_matches_f_linear(case: str) -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    bias = torch.randn(96) if case == "bias" else None
    x = {
        "2d": torch.randn(5, 64),
        "3d": torch.randn(1, 7, 64),
        "strided": torch.randn(5, 192)[:, 64:128],  # a slice of a merged projection's output
        "bias": torch.randn(3, 64),
        "empty": torch.randn(0, 64),
    }[case]
    out = _op()(x, weight, bias)
    assert out.shape == (*x.shape[:-1], 96) and out.is_contiguous()
    # oneDNN sums the 64 products in another order than MKL's sgemm: float32 rounding, ~1e-6 relative.
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_weight_is_packed_once_again_after_an_in_place_change_and_forgotten_with_it() -> None:
    op, weight, x = _op(), torch.randn(32, 16), torch.randn(2, 16)
    gc.collect()  # earlier tests' packed weights that are garbage die now, not between the counts below
    before = num_packed()
    op(x, weight)
    op(x, weight)
    assert num_packed() == before + 1  # one packed copy for both calls
    weight.mul_(2)  # the packed copy is stale now: the result must follow the new values
    torch.testing.assert_close(op(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert num_packed() == before + 1
    del weight
    gc.collect()
    assert num_packed() == before


def test_bfloat16_is_supported_only_where_onednn_packs_it() -> None:
    from fxllm.backends.registry import OpSite

    x, weight = torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    site = OpSite("linear", torch.device("cpu"), (x, weight, None))
    assert onednn_linear.supports(site) == packable(torch.bfloat16)
    if not packable(torch.bfloat16):  # as on AVX2 CPUs without AVX-NE-CONVERT: the pack itself refuses
        with pytest.raises(RuntimeError, match="bf16"):
            torch.ops.mkldnn._reorder_linear_weight(weight, 1)


@needs_handover
def test_lowering_picks_onednn_and_nothing_is_left_to_freeze() -> None:
    from fxllm.passes.lower_ops import lower_ops, lowering_decisions
    from fxllm.passes.pack_linears import pack_linears
    from fxllm.passes.registry import PassContext

    model = TiedLM().eval()
    ids = torch.randint(0, 100, (1, 9))
    gm = torch.export.export(model, (ids,)).run_decompositions({}).module()
    expected = model(ids)
    assert cpu_freezing(gm)[0]  # before: three plain linears for freezing to pack
    ctx = PassContext(device=torch.device("cpu"))
    assert pack_linears(gm, ctx).num_matches == 3
    lower_ops(gm, ctx)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(_op()) == 3 and torch.ops.aten.linear.default not in targets
    assert {d.backend for d in lowering_decisions(gm)} == {"onednn"}
    freeze, why = cpu_freezing(gm)
    assert not freeze and "no plain linears" in why
    torch.testing.assert_close(gm(ids), expected, rtol=1e-5, atol=1e-5)


@needs_handover
def test_explain_names_the_backend() -> None:
    from fxllm.compiler.api import compile_model
    from fxllm.models import load_model

    report = compile_model(load_model("tiny-llama").model, backend="eager").report()
    assert "fxllm_cpu.onednn_linear.default" in report and "priority 5 on cpu" in report


# The engine tests: tiny-llama's float32 graph through Inductor with the default cpu_freezing (auto).
BASE = ["model.model=tiny-llama", "compile.backend=inductor", "cache.num_blocks=64"]
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11] * 40]

_WARM = """
import json, sys
from fxllm import LLM, SamplingParams
from fxllm.backends.cpu import native
from fxllm.backends.cpu.onednn_linear import num_packed
native.available()  # the C++ kernels from the usual cache root, before compile.cache_dir points elsewhere
llm = LLM(overrides=sys.argv[1:])
outs = llm.generate({prompts}, SamplingParams(max_tokens=8, temperature=0))
print("RESULT " + json.dumps({{"cache": llm.build_info.compile_cache, "graph": llm.engine.runner._forward.source,
      "compiles": llm.engine.runner.num_compiles, "packed": num_packed(),
      "tokens": [list(o.outputs[0].token_ids) for o in outs]}}))
"""


def _fresh_process(cache: Path, overrides: list[str]) -> dict[str, object]:
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("FXLLM_CACHE_DIR", "FXLLM_NO_COMPILE_CACHE")}
    env.update(usual_compiled_code_dirs(), PYTHONPATH=str(REPO))  # the graph cache under test is fxllm's
    script = _WARM.format(prompts=PROMPTS)
    proc = subprocess.run([sys.executable, "-c", script, *overrides, f"compile.cache_dir={cache}"], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]


def _hf_greedy(model: torch.nn.Module) -> list[list[int]]:
    outs = []
    with torch.no_grad():
        for ids in PROMPTS:
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
            outs.append(out[0, len(ids) :].tolist())
    return outs


@needs_handover
def test_engine_matches_hf_and_a_fresh_process_loads_the_cached_graph(tmp_path: Path) -> None:
    from fxllm.models import load_model

    cold = _fresh_process(tmp_path, BASE)
    assert (
        str(cold["cache"]).startswith("miss") and cold["graph"] == "compiled"
    )  # compiled without Dynamo, so saved
    assert int(cold["packed"]) > 0  # type: ignore[call-overload]
    expected = _hf_greedy(load_model("tiny-llama").model.eval())
    assert cold["tokens"] == expected
    warm = _fresh_process(tmp_path, BASE)
    assert warm["cache"] == "hit" and warm["graph"] == "loaded" and warm["compiles"] == 0
    assert warm["packed"] == cold["packed"]  # the warm start packs the weights too
    assert warm["tokens"] == expected
