"""FP8 KV cache (cache.dtype: fp8): the reference op's quantization, the CPU lowering, the engine.

The reference's FP8 path must equal the float path run on dequantize(quantize(k, v)) to float32 rounding
(1e-5 relative): the FP8 cache changes the values attention reads and nothing else. Against the unquantized
cache the error is e4m3's (3 mantissa bits: <= 2^-4 relative per element); attention averages it, so the
output is within 5% (measured ~2-3% on these random inputs).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import fxllm.backends.cpu  # noqa: F401  (registers the C++ CPU implementations)
from fxllm.backends.registry import OpSite, choose_implementation
from fxllm.backends.triton.selfcheck import make_paged_case, rel_err
from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.ops.kv_quant import FP8_KV_DTYPE, FP8_MAX, KV_SCALES_ATTR, dequantize_kv, quantize_kv
from fxllm.ops.paged_attention import paged_attention_reference
from fxllm.runtime.sampling_params import SamplingParams

CASES = {
    "decode": ([1, 1, 1], [9, 33, 17]),
    "prefill chunked": ([5, 16, 3], [5, 40, 20]),
}
SCALES = {
    "unit": (torch.tensor([1.0]), torch.tensor([1.0])),
    "per tensor": (torch.tensor([0.5]), torch.tensor([2.0])),
    "per head": (torch.tensor([0.5, 1.5]), torch.tensor([2.0, 0.25])),
}


def _meta(c):  # type: ignore[no-untyped-def]
    return (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)


@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("case", list(CASES))
def test_reference_reads_what_it_quantized(case: str, scales: str) -> None:
    q_lens, ctx_lens = CASES[case]
    c = make_paged_case(q_lens, ctx_lens, 4, 2, 32, block_size=8, seed=3)
    k_scale, v_scale = SCALES[scales]
    # The reference pads decode contexts to the longest and multiplies 0 probabilities by the padding: it
    # needs finite caches (the Triton check poisons them instead).
    k_fp8, v_fp8 = quantize_kv(c.k_cache_ref, k_scale), quantize_kv(c.v_cache_ref, v_scale)
    assert k_fp8.dtype == FP8_KV_DTYPE
    out = paged_attention_reference(c.q, c.k, c.v, k_fp8, v_fp8, *_meta(c), k_scale=k_scale, v_scale=v_scale)
    # The same step over float caches holding the dequantized context, with this step's k/v quantized too.
    k_deq, v_deq = dequantize_kv(k_fp8, k_scale, torch.float32), dequantize_kv(v_fp8, v_scale, torch.float32)
    k_new = dequantize_kv(quantize_kv(c.k, k_scale), k_scale, torch.float32)
    v_new = dequantize_kv(quantize_kv(c.v, v_scale), v_scale, torch.float32)
    ref = paged_attention_reference(c.q, k_new, v_new, k_deq, v_deq, *_meta(c))
    n = c.num_real
    assert bool(torch.isfinite(out[:n]).all())
    assert rel_err(out[:n], ref[:n]) <= 1e-5
    # This step's rows were written, quantized, where slot_mapping points.
    written = k_fp8.view(-1, 2, 32)[c.slot_mapping[c.slot_mapping >= 0]]
    assert torch.equal(written.view(torch.uint8), quantize_kv(c.k[:n], k_scale).view(torch.uint8))
    # Against the unquantized cache: e4m3's error, averaged by attention.
    exact = paged_attention_reference(c.q, c.k, c.v, c.k_cache_ref.clone(), c.v_cache_ref.clone(), *_meta(c))
    assert 1e-4 < rel_err(out[:n], exact[:n]) <= 0.05


def test_quantize_saturates_and_scale_checks() -> None:
    x = torch.tensor([[[1000.0, -1000.0, 3.0]]])
    q = quantize_kv(x, torch.tensor([1.0]))
    assert q.float().tolist() == [[[FP8_MAX, -FP8_MAX, 3.0]]]  # clamped, not NaN (e4m3fn has no inf)
    with pytest.raises(ValueError, match="one per KV head"):
        quantize_kv(torch.ones(2, 3, 4), torch.ones(2))
    with pytest.raises(ValueError, match="without its scale"):
        dequantize_kv(q, None, torch.float32)


def test_cpu_lowering_sends_fp8_caches_to_the_reference(native_op) -> None:  # type: ignore[no-untyped-def]
    c = make_paged_case([1, 4], [9, 12], 4, 2, 32, block_size=8, seed=5)
    fp8_cache = torch.empty(4, 8, 2, 32, dtype=FP8_KV_DTYPE)
    args = (c.q, c.k, c.v, fp8_cache, fp8_cache)
    assert choose_implementation(OpSite("paged_attention", torch.device("cpu"), args)).backend == "torch"
    float_args = (c.q, c.k, c.v, c.k_cache, c.v_cache)
    assert choose_implementation(OpSite("paged_attention", torch.device("cpu"), float_args)).backend == "cpu"
    # Called directly, the C++ op hands FP8 caches to the reference: identical results.
    scales = SCALES["per head"]
    k1, v1 = quantize_kv(c.k_cache_ref, scales[0]), quantize_kv(c.v_cache_ref, scales[1])
    k2, v2 = k1.clone(), v1.clone()
    ref = paged_attention_reference(c.q, c.k, c.v, k1, v1, *_meta(c), -1, 0.0, None, *scales)
    out = native_op("paged_attention")(c.q, c.k, c.v, k2, v2, *_meta(c), -1, 0.0, None, *scales)
    assert torch.equal(out, ref) and torch.equal(k1.view(torch.uint8), k2.view(torch.uint8))
    # The C++ kernel over the float cache vs the FP8 reference: e4m3's error only.
    float_caches = (c.k_cache_ref.clone(), c.v_cache_ref.clone())
    exact = native_op("paged_attention")(c.q, c.k, c.v, *float_caches, *_meta(c))
    assert rel_err(out[: c.num_real], exact[: c.num_real]) <= 0.05


# ---- the engine on tiny-llama (eager backend: no Inductor compile) ----

_gen = torch.Generator().manual_seed(11)
PREFIX = torch.randint(3, 512, (40,), generator=_gen).tolist()
PROMPTS = [PREFIX + torch.randint(3, 512, (n,), generator=_gen).tolist() for n in (5, 11)]
PROMPTS.append(torch.randint(3, 512, (23,), generator=_gen).tolist())
NEW = 10
GREEDY = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return load_model("tiny-llama").model


def _llm(model: torch.nn.Module, *overrides: str) -> LLM:
    config = load_config(None, ["compile.backend=eager", "cache.block_size=16", *overrides])
    return LLM(copy.deepcopy(model), config=config)


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def fp8_run(tiny: torch.nn.Module) -> tuple[LLM, list[list[int]]]:
    llm = _llm(tiny, "cache.dtype=fp8")
    first = _tokens(llm, PROMPTS[:1])  # the prefix's blocks go to the prefix cache
    rest = llm.generate(PROMPTS[1:], GREEDY)
    # The second prompt started from the first one's two full cached prefix blocks.
    assert rest[0].metrics is not None and rest[0].metrics.num_cached_tokens == 32
    return llm, first + [out.outputs[0].token_ids for out in rest]


def test_fp8_pool_and_greedy_agreement(tiny: torch.nn.Module, fp8_run: tuple[LLM, list[list[int]]]) -> None:
    llm, fp8_tokens = fp8_run
    auto = _llm(tiny)
    runner, auto_runner = llm.engine.runner, auto.engine.runner
    assert all(c.dtype == FP8_KV_DTYPE for c in runner.kv_caches)
    # Same byte budget: float32 -> e4m3 is 4x the blocks (bfloat16 -> e4m3 would be 2x).
    assert runner.num_blocks == 4 * auto_runner.num_blocks
    auto_tokens = _tokens(auto, PROMPTS)
    # Random tiny weights make near-flat logits, so FP8 rounding can flip a later greedy pick; the first
    # token of every prompt and at least 2/3 of all tokens agree (measured: 2 of 3 prompts agree fully).
    assert [t[0] for t in fp8_tokens] == [t[0] for t in auto_tokens]
    same = sum(a == b for x, y in zip(fp8_tokens, auto_tokens) for a, b in zip(x, y))
    assert same >= 2 * NEW * len(PROMPTS) // 3, (fp8_tokens, auto_tokens)
    # Every attention node reads its scales from graph attributes (1.0: the preset has none).
    gm = runner.graph_module
    assert float(gm.kv_scale_0_k) == 1.0 and float(gm.kv_scale_1_v) == 1.0


def test_fp8_prefix_cache_hit_equals_a_cold_prefill(
    tiny: torch.nn.Module, fp8_run: tuple[LLM, list[list[int]]]
) -> None:
    _, fp8_tokens = fp8_run  # its second prompt read 32 cached FP8 tokens (asserted in the fixture)
    cold = _llm(tiny, "cache.dtype=fp8", "cache.enable_prefix_caching=false")
    assert _tokens(cold, PROMPTS) == fp8_tokens


def test_fp8_preemption_recomputes_the_same_tokens(
    tiny: torch.nn.Module, fp8_run: tuple[LLM, list[list[int]]]
) -> None:
    _, fp8_tokens = fp8_run
    # 9 blocks of 16 tokens hold the three prompts (3 + 4 + 2 blocks) but not their growth (4 + 4 + 3):
    # decoding preempts a sequence, which is recomputed later.
    small = _llm(tiny, "cache.dtype=fp8", "cache.num_blocks=9", "cache.enable_prefix_caching=false")
    assert _tokens(small, PROMPTS) == fp8_tokens
    assert small.engine.stats.num_preemptions > 0


def test_checkpoint_scales_reach_the_graph(tiny: torch.nn.Module) -> None:
    model = copy.deepcopy(tiny)
    setattr(model, KV_SCALES_ATTR, {0: (2.0, 0.5), 1: (torch.tensor([0.25]), torch.tensor([4.0]))})
    llm = LLM(model, config=load_config(None, ["compile.backend=eager", "cache.dtype=fp8"]))
    gm = llm.engine.runner.graph_module
    assert [float(getattr(gm, f"kv_scale_{i}_{kv}")) for i in (0, 1) for kv in "kv"] == [2.0, 0.5, 0.25, 4.0]
    out = llm.generate([PROMPTS[2]], GREEDY)[0].outputs[0].token_ids
    assert len(out) == NEW
    with pytest.raises(Exception, match="attention layers"):
        setattr(model, KV_SCALES_ATTR, {5: (1.0, 1.0)})
        LLM(model, config=load_config(None, ["compile.backend=eager", "cache.dtype=fp8"]))


def test_cache_dtype_is_checked_and_keyed(tiny: torch.nn.Module) -> None:
    from fxllm.compiler.cache_build import start_key

    with pytest.raises(ValueError, match=r"cache\.dtype"):
        load_config(None, ["cache.dtype=int8"])
    keys = {}
    for dtype in ("auto", "fp8"):
        config = load_config(None, [f"cache.dtype={dtype}"])
        keys[dtype] = start_key(config, tiny, "tiny-llama", torch.device("cpu"), torch.float32)[1]["kv cache"]
    assert keys == {"auto": "auto", "fp8": "fp8"}


def test_fp8_warm_start_from_the_compile_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: torch.nn.Module
) -> None:
    from fxllm.backends.cpu import native

    native.available()  # loaded from the usual place, not rebuilt under the temporary root
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(tmp_path / "fxllm-cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)
    model = copy.deepcopy(tiny)
    setattr(model, KV_SCALES_ATTR, {0: (2.0, 0.5)})
    overrides = ["compile.backend=eager", "cache.dtype=fp8", "cache.num_blocks=32"]
    cold = LLM(copy.deepcopy(model), config=load_config(None, overrides))
    warm = LLM(copy.deepcopy(model), config=load_config(None, overrides))
    assert cold.build_info.compile_cache.startswith("miss") and warm.build_info.compile_cache == "hit"
    assert float(warm.engine.runner.graph_module.kv_scale_0_k) == 2.0
    assert _tokens(warm, PROMPTS[2:]) == _tokens(cold, PROMPTS[2:])
    # Other scales are another entry, never the stored constants of this one.
    setattr(model, KV_SCALES_ATTR, {0: (4.0, 0.5)})
    other = LLM(copy.deepcopy(model), config=load_config(None, overrides))
    assert other.build_info.compile_cache.startswith("miss")
    assert float(other.engine.runner.graph_module.kv_scale_0_k) == 4.0
