"""Speculative decoding through the engine (issue 16): what a user sees equals plain decoding.

tiny-llama in float32 (eager), n-gram prompt lookup on prompts that repeat themselves (so drafts are
proposed and partly accepted). Every case streams DELTA outputs through two engines, speculation off
and on, and compares token ids, text and finish/stop reasons: greedy, prefix caching (a second round
reuses cached blocks), chunked prefill with a budget that cuts drafts, preemption in a tiny pool, n > 1,
stop strings. After each run the pool holds no leaked blocks and every block in the prefix cache holds
tokens that some sequence really has at that place (no unaccepted draft is ever cached).
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import LoadedModel, load_model
from fxllm.runtime.engine import Engine
from fxllm.runtime.sampling_params import RequestOutputKind, SamplingParams

GEN = torch.Generator().manual_seed(11)
BASES = [torch.randint(3, 400, (n,), generator=GEN).tolist() for n in (6, 11, 17, 9)]
PROMPTS = [b * 3 for b in BASES] + [BASES[0] + BASES[1] * 2, BASES[2]]  # repeats give the lookup matches
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def parts(smollm2: LoadedModel) -> tuple[torch.nn.Module, Any]:
    tokenizer = smollm2.tokenizer  # decodes the tiny model's ids (< 512) into real text
    return load_model("tiny-llama").model, tokenizer


def make_engine(parts: tuple[torch.nn.Module, Any], spec: bool, *overrides: str) -> Engine:
    model, tokenizer = parts
    sections = (
        ["speculative.method=ngram", "speculative.min_acceptance_rate=0", "speculative.auto_disable=off"]
        if spec
        else []
    )
    config = load_config(None, ["compile.backend=eager", "model.dtype=float32", *sections, *overrides])
    return LLM(copy.deepcopy(model), config=config, tokenizer=tokenizer).engine


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> dict[tuple[int, int], Any]:
    """Stream every request to its end; per (request, index): token ids, text, (finish, stop) reasons."""
    got: dict[tuple[int, int], Any] = {}
    for i, (prompt, params) in enumerate(requests):
        params = copy.copy(params)
        params.output_kind = RequestOutputKind.DELTA
        engine.add_request(prompt, params, f"r{i}")
    while engine.has_unfinished():
        for output in engine.step():
            i = int(output.request_id[1:])
            for c in output.outputs:
                ids, text, _ = got.get((i, c.index), ([], "", None))
                got[(i, c.index)] = (ids + c.token_ids, text + c.text, (c.finish_reason, c.stop_reason))
    check_pool(engine, requests, got)
    return got


def check_pool(engine: Engine, requests: list[tuple[list[int], SamplingParams]], got: dict[Any, Any]) -> None:
    """No leaked block; each cached block's tokens stand at a block-aligned place of a real sequence."""
    kv = engine.kv_cache
    kv.check_invariants()
    assert kv.num_used_blocks == 0
    bs = kv.block_size
    real = {tuple((requests[i][0] + ids)[j : j + bs]) for (i, _), (ids, _, _) in got.items()
            for j in range(0, len(requests[i][0]) + len(ids), bs)}  # fmt: skip
    cached = [t for t in kv._block_tokens if t is not None]
    assert all(t in real for t in cached), "a block holding unaccepted drafts entered the prefix cache"


def accepted(engine: Engine) -> int:
    stats = engine.speculator.stats  # type: ignore[union-attr]
    assert stats.draft_tokens > 0, "nothing was drafted: the test checks nothing"
    return stats.accepted_tokens


CASES = {
    "default": [],
    "chunked-prefill": ["scheduler.max_num_batched_tokens=8"],  # drafts of a decode are cut by the budget
    "tiny-pool-preempts": ["cache.num_blocks=14", "cache.block_size=8"],
    "no-prefix-caching": ["cache.enable_prefix_caching=false"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_plain_decoding(parts, case: str) -> None:
    requests = [(p, GREEDY) for p in PROMPTS]
    plain = run(make_engine(parts, False, *CASES[case]), requests)
    spec_engine = make_engine(parts, True, *CASES[case])
    assert run(spec_engine, requests) == plain
    assert accepted(spec_engine) > 0
    if case == "tiny-pool-preempts":
        assert spec_engine.stats.num_preemptions > 0


def test_prefix_cache_second_round_and_n(parts) -> None:
    """A second round hits blocks cached by the first; n = 2 seeded sampling equals plain decoding."""
    sampled = SamplingParams(max_tokens=16, temperature=0, n=2, ignore_eos=True)
    requests = [(p, GREEDY) for p in PROMPTS[:3]] + [(PROMPTS[3], sampled)]
    plain_engine, spec_engine = make_engine(parts, False), make_engine(parts, True)
    for _ in range(2):
        assert run(spec_engine, requests) == run(plain_engine, requests)
    assert spec_engine.kv_cache.stats.num_hit_tokens > 0
    assert accepted(spec_engine) > 0


def test_stop_string_inside_an_accepted_run(parts) -> None:
    """A stop string met inside a verified run ends the output where plain decoding ends it."""
    plain = run(make_engine(parts, False), [(PROMPTS[0], GREEDY)])
    text = plain[(0, 0)][1]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    requests = [(p, params) for p in PROMPTS]
    spec_engine = make_engine(parts, True)
    expected = run(make_engine(parts, False), requests)
    assert run(spec_engine, requests) == expected
    assert expected[(0, 0)][2] == ("stop", stop)
    assert accepted(spec_engine) > 0


def test_per_request_stats_and_auto_disable(parts) -> None:
    """Outputs carry acceptance; a step above disable_batch_size drafts nothing; low acceptance stops a request."""
    engine = make_engine(parts, True, "speculative.disable_batch_size=2")
    for i, p in enumerate(PROMPTS):  # of different lengths: the last two run on alone
        engine.add_request(p, SamplingParams(max_tokens=8 + 4 * i, temperature=0, ignore_eos=True), f"r{i}")
    outs = engine.run_until_done()
    stats = engine.speculator.stats  # type: ignore[union-attr]
    assert stats.steps_disabled_batch > 0
    drafted = [o for o in outs if o.metrics.spec_draft_tokens]
    assert drafted, "nothing drafted once the batch shrank to 2 sequences"
    for o in drafted:
        m = o.metrics
        assert 0 <= m.spec_acceptance_rate <= 1 and 1 <= m.spec_mean_accepted_length <= 5
    low = make_engine(parts, False)
    from fxllm.runtime.speculative.decoder import NgramProposer, build_speculator

    config = load_config(None, ["speculative.method=ngram", "speculative.min_acceptance_rate=1.0",
                                "speculative.min_acceptance_window=1"]).speculative  # fmt: skip
    speculator = build_speculator(config, low)
    assert isinstance(speculator.proposer, NgramProposer)  # type: ignore[union-attr]
    for i, p in enumerate(PROMPTS):
        low.add_request(p, GREEDY, f"r{i}")
    low.run_until_done()
    stats = speculator.stats  # type: ignore[union-attr]
    # Every request that had a draft rejected stopped after that step: at most one verify step each.
    assert stats.requests_disabled > 0


@pytest.mark.parametrize("method", ["draft_model", "self_draft"])
def test_model_drafters(method: str) -> None:
    """A draft engine proposes: the target as its own draft model accepts everything; self_draft (the
    first of tiny-llama's 2 layers + norm + head) gives plain decoding's tokens."""
    base = ["model.model=tiny-llama", "compile.backend=eager", "model.dtype=float32"]
    extra = ["speculative.model=tiny-llama"] if method == "draft_model" else ["speculative.draft_layers=1"]
    plain = LLM(overrides=base)
    spec = LLM(
        overrides=[
            *base,
            f"speculative.method={method}",
            "speculative.min_acceptance_rate=0",
            "speculative.auto_disable=off",
            *extra,
        ]
    )
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params)]
    outs = spec.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    stats = spec.engine.speculator.stats  # type: ignore[union-attr]
    assert stats.draft_tokens > 0
    if method == "draft_model":
        assert stats.accepted_tokens == stats.draft_tokens


def test_mixed_with_requests_that_do_not_speculate(parts) -> None:
    """Logprobs and penalty requests decode plainly in the same verify steps; all equal plain decoding."""
    with_logprobs = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    penalized = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    requests = [
        (PROMPTS[0], GREEDY),
        (PROMPTS[1], with_logprobs),
        (PROMPTS[2], penalized),
        (PROMPTS[3], GREEDY),
    ]
    spec_engine = make_engine(parts, True)
    assert run(spec_engine, requests) == run(make_engine(parts, False), requests)
    assert accepted(spec_engine) > 0


def test_temperature_one_distribution_through_the_engine(parts) -> None:
    """tiny-llama, temperature 1 with top_k 3 (27 outcomes for 3 tokens): 500 seeded requests with oracle
    drafts (plain greedy's continuation, so drafts are both accepted and rejected) vs 500 without. The joint
    histograms must agree: two-sample chi-square < 54.1 (26 degrees of freedom, p = 0.001)."""
    from fxllm.runtime.speculative.decoder import SpeculativeDecoder
    from fxllm.runtime.speculative.oracle import OracleProposer

    prompt, count = PROMPTS[0], 500
    plain_engine = make_engine(parts, False)
    plain_engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "g")
    want = plain_engine.run_until_done()[0].outputs[0].token_ids
    spec_engine = make_engine(parts, True, "speculative.disable_batch_size=0")
    config = spec_engine.speculator.config  # type: ignore[union-attr]
    spec_engine.speculator = SpeculativeDecoder(config, OracleProposer({tuple(prompt): want}))
    histograms = []
    for engine in (plain_engine, spec_engine):
        for seed in range(count):
            params = SamplingParams(max_tokens=3, temperature=1.0, top_k=3, seed=seed, ignore_eos=True)
            engine.add_request(prompt, params, f"s{seed}")
        outs = engine.run_until_done()
        histograms.append(Counter(tuple(o.outputs[0].token_ids) for o in outs))
    stats = spec_engine.speculator.stats  # type: ignore[union-attr]
    assert 0 < stats.accepted_tokens < stats.draft_tokens  # both branches of the rejection test ran
    a, b = histograms
    chi2 = sum((a[c] - b[c]) ** 2 / (a[c] + b[c]) for c in set(a) | set(b))
    assert len(set(a) | set(b)) <= 27 and chi2 < 54.1, (chi2, a, b)
