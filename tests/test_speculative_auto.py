"""Speculation switches itself off when it does not pay (issue 16, scope 5): policy.py through the engine.

The cost model is driven by a fake clock that the runner advances per forward (a verify step costs what the
test says), so the verdicts are deterministic; drafts come from an oracle (the plain greedy continuation:
every draft accepted) or from proposers that are always wrong. In every case the outputs must equal plain
decoding token for token: the policy only decides WHEN to draft.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from fxllm.config import config_from_dict, load_config
from fxllm.llm import LLM
from fxllm.models import LoadedModel, load_model
from fxllm.runtime.engine import Engine
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.sequence import Sequence
from fxllm.runtime.speculative.decoder import SpeculativeDecoder
from fxllm.runtime.speculative.oracle import OracleProposer
from fxllm.runtime.speculative.policy import MIN_SAMPLES, StepCostModel, batch_bucket

GEN = torch.Generator().manual_seed(5)
PROMPTS = [torch.randint(3, 400, (n,), generator=GEN).tolist() for n in (9, 14)]
MAX_TOKENS = 40
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def parts(smollm2: LoadedModel) -> tuple[torch.nn.Module, Any]:
    return load_model("tiny-llama").model, smollm2.tokenizer  # decodes the tiny model's ids into text


def make_engine(parts: tuple[torch.nn.Module, Any], *overrides: str) -> Engine:
    model, tokenizer = parts
    config = load_config(None, ["compile.backend=eager", "model.dtype=float32", *overrides])
    return LLM(copy.deepcopy(model), config=config, tokenizer=tokenizer).engine


@pytest.fixture(scope="module")
def plain(parts) -> list[list[int]]:
    """Plain greedy decoding of PROMPTS, batched (the reference every speculative run must reproduce)."""
    engine = make_engine(parts)
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, f"p{i}")
    return [o.outputs[0].token_ids for o in sorted(engine.run_until_done(), key=lambda o: o.request_id)]


class FakeClock:
    """Time that passes only in forwards: `verify` units for a step with drafts, 1 for any other."""

    def __init__(self, engine: Engine, verify: float) -> None:
        self.now, self.verify = 0.0, verify
        forward = engine.runner.execute

        def execute(inputs: Any) -> Any:
            self.now += self.verify if any(inputs.draft_counts) else 1.0
            return forward(inputs)

        engine.runner.execute = execute  # type: ignore[method-assign]

    def __call__(self) -> float:
        return self.now


def run(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(p, GREEDY, f"r{i}")
    return [o.outputs[0].token_ids for o in sorted(engine.run_until_done(), key=lambda o: o.request_id)]


def speculate(parts, proposer: Any, verify_cost: float, *overrides: str) -> tuple[Engine, SpeculativeDecoder]:
    """An n-gram-configured engine whose speculator drafts with `proposer` under a fake clock."""
    engine = make_engine(parts, "speculative.method=ngram", "speculative.disable_batch_size=0", *overrides)
    assert engine.speculator is not None
    speculator = SpeculativeDecoder(engine.speculator.config, proposer)
    speculator.clock = FakeClock(engine, verify_cost)
    engine.speculator = speculator
    return engine, speculator


# ---- the cost model alone ------------------------------------------------------------------------


def test_cost_model_verdicts_exploration_and_outliers() -> None:
    model = StepCostModel(margin=0.1, explore_interval=3)
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 32, 33)] == [1, 2, 4, 4, 8, 32, 64]
    # Warm-up: alternate the kinds until both have MIN_SAMPLES samples.
    kinds = []
    for _ in range(2 * MIN_SAMPLES):
        decision = model.decide(1, 2.0)
        assert decision.reason == "warmup"
        kinds.append(decision.speculate)
        model.record(1, decision.speculate, 3.0 if decision.speculate else 1.0)
    assert kinds == [True, False, True, False]
    # Verify 3 s for 2 tokens against decode 1 s per token: 0.67x, off; after 3 steps without a verify sample
    # (the warm-up's last step was plain) one re-measures it.
    verdicts = []
    for _ in range(8):
        decision = model.decide(1, 2.0)
        verdicts.append((decision.speculate, decision.reason))
        model.record(1, decision.speculate, 3.0 if decision.speculate else 1.0)
    assert decision.expected_gain == pytest.approx(2 / 3)
    off, explore = (False, "cost"), (True, "explore")
    assert verdicts == [off, off, explore, off, off, off, explore, off]
    # Another bucket knows nothing yet.
    assert model.decide(4, 8.0).reason == "warmup"
    # Verification turns cheap (verify samples far below the estimate replace it): 1.2 s for 2 tokens is
    # 1.67x, on; every 3rd step re-measures a plain decode.
    model.record(1, True, 1.2)
    verdicts = []
    for _ in range(8):
        decision = model.decide(1, 2.0)
        verdicts.append((decision.speculate, decision.reason))
        model.record(1, decision.speculate, 1.2 if decision.speculate else 1.0)
    on, explore_plain = (True, "cost"), (False, "explore")
    assert set(verdicts) == {on, explore_plain}
    explored = [i for i, v in enumerate(verdicts) if v == explore_plain]
    assert len(explored) == 2 and explored[1] - explored[0] == 4  # 3 verify steps, then a plain one
    # A single slow step (a compile) is ignored; three in a row are believed.
    verify = model.verify[1]
    before = verify.seconds
    model.record(1, True, 100.0)
    assert verify.seconds == before
    model.record(1, True, 100.0)
    model.record(1, True, 100.0)
    assert verify.seconds > before


# ---- through the engine --------------------------------------------------------------------------


def test_expensive_verification_switches_speculation_off(parts, plain) -> None:
    """Verify steps cost 10 decode steps (at most 5 tokens each): after the warm-up the cost model keeps
    steps plain, drafting only every `auto_explore_interval`-th step; outputs equal plain decoding."""
    oracle = OracleProposer({tuple(p): out for p, out in zip(PROMPTS, plain)})
    engine, spec = speculate(parts, oracle, 10.0, "speculative.auto_explore_interval=8")
    assert run(engine, PROMPTS) == plain
    stats = spec.stats
    assert stats.steps_skipped_cost > 0 and stats.steps_explored > 0
    # Warm-up drafts MIN_SAMPLES times, then about one step in 9 explores; the rest is skipped.
    assert stats.steps_speculated <= MIN_SAMPLES + stats.steps_skipped_cost // 8 + 1
    assert stats.steps_skipped_cost > 3 * stats.steps_speculated
    assert stats.accepted_tokens == stats.draft_tokens > 0  # oracle drafts: every one accepted


def test_cheap_verification_keeps_speculating(parts, plain) -> None:
    """Verify steps cost what a decode step costs and every draft is accepted: the cost model never skips a
    step; only warm-up and exploration run plain steps."""
    oracle = OracleProposer({tuple(p): out for p, out in zip(PROMPTS, plain)})
    engine, spec = speculate(parts, oracle, 1.0, "speculative.auto_explore_interval=4")
    assert run(engine, PROMPTS) == plain
    stats = spec.stats
    assert stats.steps_skipped_cost == 0 and stats.steps_speculated > 0
    assert stats.draft_tokens > MAX_TOKENS  # two sequences drafting most of their tokens


def test_auto_disable_off_always_speculates(parts, plain) -> None:
    oracle = OracleProposer({tuple(p): out for p, out in zip(PROMPTS, plain)})
    engine, spec = speculate(parts, oracle, 10.0, "speculative.auto_disable=off")
    assert run(engine, PROMPTS) == plain
    assert spec.cost is None and spec.stats.steps_skipped_cost == spec.stats.steps_explored == 0
    assert spec.stats.steps_speculated > 0


def test_ngram_under_expensive_verification_equals_plain(parts, plain) -> None:
    """The real n-gram drafter with the switch turning speculation on and off: same tokens."""
    engine = make_engine(parts, "speculative.method=ngram", "speculative.auto_explore_interval=2")
    spec = engine.speculator
    assert spec is not None
    spec.clock = FakeClock(engine, 4.0)
    repeated = [p * 3 for p in PROMPTS]  # the lookup finds matches in a prompt that repeats itself
    want = run(make_engine(parts), repeated)
    assert run(engine, repeated) == want
    assert spec.stats.draft_tokens > 0


# ---- per-sequence backoff ------------------------------------------------------------------------


class WrongDrafts:
    """Drafts tokens that are never the greedy continuation; records when it was asked."""

    def __init__(self, plain: dict[tuple[int, ...], list[int]]) -> None:
        self.plain = plain
        self.asked: list[int] = []  # the sequence's output length at each proposal

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        drafts = []
        for seq, limit in zip(seqs, limits):
            follow = self.plain[tuple(seq.token_ids[: seq.num_prompt_tokens])]
            done = seq.num_output_tokens
            self.asked.append(done)
            drafts.append([(t + 1) % 400 for t in follow[done : done + limit]])
        return drafts


class StatefulWrongDrafts(WrongDrafts):
    """Like WrongDrafts, with a per-step hook (as EAGLE-3's head has): a backoff lasts the whole request."""

    def before_step(self, engine: Engine) -> None:
        """Nothing to catch up."""


BACKOFF = ["speculative.num_speculative_tokens=2", "speculative.min_acceptance_rate=0.5",
           "speculative.min_acceptance_window=2", "speculative.backoff_tokens=4",
           "speculative.backoff_max_tokens=8", "speculative.auto_disable=off"]  # fmt: skip


def test_low_acceptance_backs_off_doubling_then_resumes(parts, plain) -> None:
    """Window 2 = one verify step of k = 2 wrong drafts: each backoff starts there; it lasts 4 tokens, then 8
    (doubled, capped at 8); after each the sequence drafts again."""
    proposer = WrongDrafts({tuple(PROMPTS[0]): plain[0]})
    engine, spec = speculate(parts, proposer, 1.0, *BACKOFF)
    assert run(engine, PROMPTS[:1]) == plain[:1]
    # Output 1 (the prefill's token) drafts, gains 1 token, backs off until 1 + 4; at 5 drafts, backs off
    # until 5 + 8 = 13; then 13 -> 21 -> 29 -> 37; at 37 only one token of room is left, so drafting stops
    # at max_tokens - 1.
    assert proposer.asked == [1, 5, 13, 21, 29, 37]
    assert spec.stats.backoffs == 6 and spec.stats.requests_disabled == 1
    assert spec.stats.accepted_tokens == 0


def test_stateful_drafter_backs_off_for_the_rest_of_the_request(parts, plain) -> None:
    proposer = StatefulWrongDrafts({tuple(PROMPTS[0]): plain[0]})
    engine, spec = speculate(parts, proposer, 1.0, *BACKOFF)
    request = engine.build_request(PROMPTS[0], GREEDY, "s")
    engine.add(request)
    outs = engine.run_until_done()
    assert outs[0].outputs[0].token_ids == plain[0]
    assert proposer.asked == [1] and spec.stats.backoffs == 1
    assert spec.stopped(request)


# ---- config and /metrics ---------------------------------------------------------------------------


def test_config_keys() -> None:
    spec = load_config(None, ["speculative.auto_disable=off", "speculative.auto_margin=0.25"]).speculative
    assert spec.auto_disable == "off" and spec.auto_margin == 0.25
    assert load_config(None, []).speculative.auto_disable == "on"  # the CPU-safe default
    assert (
        config_from_dict({"speculative": {"auto_disable": False}}).speculative.auto_disable == "off"
    )  # YAML
    with pytest.raises(ValueError, match=r"unknown key speculative\.auto_disabled"):
        load_config(None, ["speculative.auto_disabled=on"])
    with pytest.raises(ValueError, match=r"speculative\.auto_disable: must be on or off"):
        load_config(None, ["speculative.auto_disable=maybe"])
    with pytest.raises(ValueError, match=r"speculative\.backoff_tokens"):
        load_config(None, ["speculative.backoff_tokens=0"])


def test_metrics_show_the_switches() -> None:
    from fxllm.runtime.speculative.decoder import SpecStats
    from fxllm.serve.metrics import ServerMetrics

    stats = SpecStats(
        steps_speculated=7, steps_skipped_cost=5, steps_explored=2, backoffs=3, requests_disabled=1
    )
    engine = SimpleNamespace(
        stats=SimpleNamespace(prefix_hit_rate=0.0),
        kv_cache=SimpleNamespace(num_used_blocks=0, num_blocks=8),
        scheduler=SimpleNamespace(num_running=0, num_waiting=0),
        speculator=SimpleNamespace(stats=stats),
    )
    server = ServerMetrics("m")
    server.update_engine_gauges(engine)
    text = server.render().decode()
    for line in ('fxllm:spec_decode_steps_speculated{model_name="m"} 7.0',
                 'fxllm:spec_decode_steps_skipped_cost{model_name="m"} 5.0',
                 'fxllm:spec_decode_steps_explored{model_name="m"} 2.0',
                 'fxllm:spec_decode_backoffs{model_name="m"} 3.0',
                 'fxllm:spec_decode_disabled_requests{model_name="m"} 1.0'):  # fmt: skip
        assert line in text, line
