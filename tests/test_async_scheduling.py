"""Async scheduling (issue 14): launching step N+1 before reading step N's ids changes nothing a user sees.

Each test runs the same requests through two engines over the same tiny model, one with
`scheduler.async_scheduling` on and one with it off, and compares every streamed delta joined up:
token ids, text, finish and stop reasons, logprobs. Stops take effect one step late inside the async
engine (the finished sequence runs one more token), never in the outputs; KV blocks are all freed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import LoadedModel, load_model
from fxllm.runtime.engine import Engine
from fxllm.runtime.sampling_params import RequestOutputKind, SamplingParams
from fxllm.runtime.step_inputs import PENDING_TOKEN

PRESET = "tiny-llama"
GEN = torch.Generator().manual_seed(3)
PROMPTS = [torch.randint(3, 400, (n,), generator=GEN).tolist() for n in (5, 23, 40, 9, 70, 14)]


@dataclass
class Stream:
    """Everything one request handed out, deltas joined."""

    token_ids: dict[int, list[int]] = field(default_factory=dict)
    text: dict[int, str] = field(default_factory=dict)
    finish: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    logprobs: dict[int, list[Any]] = field(default_factory=dict)

    def add(self, output: Any) -> None:
        for c in output.outputs:
            self.token_ids.setdefault(c.index, []).extend(c.token_ids)
            self.text[c.index] = self.text.get(c.index, "") + c.text
            if c.finish_reason is not None:
                assert c.index not in self.finish, "a sequence reported its finish twice"
                self.finish[c.index] = (c.finish_reason, c.stop_reason)
            if c.logprobs is not None:
                self.logprobs.setdefault(c.index, []).extend(
                    {t: round(lp.logprob, 4) for t, lp in entry.items()} for entry in c.logprobs
                )


@pytest.fixture(scope="module")
def parts(smollm2: LoadedModel) -> tuple[torch.nn.Module, Any]:
    tokenizer = smollm2.tokenizer  # decodes the tiny model's ids (< 512) into real text
    return load_model(PRESET).model, tokenizer


def make_engine(parts: tuple[torch.nn.Module, Any], async_on: bool, *overrides: str) -> Engine:
    model, tokenizer = parts
    config = load_config(
        None, ["compile.backend=eager", f"scheduler.async_scheduling={str(async_on).lower()}", *overrides]
    )
    engine = LLM(copy.deepcopy(model), config=config, tokenizer=tokenizer).engine
    assert engine.async_scheduling is async_on
    return engine


def run(
    engine: Engine,
    requests: list[tuple[list[int], SamplingParams]],
    abort_after: dict[int, int] | None = None,
) -> dict[int, Stream]:
    """Stream every request (DELTA outputs) to the end; request i is aborted once it holds abort_after[i] tokens."""
    abort_after = abort_after or {}
    streams = {i: Stream() for i in range(len(requests))}
    for i, (prompt, params) in enumerate(requests):
        params = copy.copy(params)
        params.output_kind = RequestOutputKind.DELTA
        engine.add_request(prompt, params, f"r{i}")
    while engine.has_unfinished():
        for output in engine.step():
            i = int(output.request_id[1:])
            streams[i].add(output)
            if i in abort_after and len(streams[i].token_ids.get(0, [])) >= abort_after[i]:
                final = engine.abort(output.request_id)
                if final is not None:
                    streams[i].add(final)
        check_no_placeholders(engine)
    engine.kv_cache.check_invariants()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks, "every KV block is freed at the end"
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0
    return streams


def check_no_placeholders(engine: Engine) -> None:
    """Between steps token ids and prefix-cached blocks hold known tokens only."""
    for request in engine.requests.values():
        for state in request.states:
            assert PENDING_TOKEN not in state.seq.token_ids
    for tokens in engine.kv_cache._block_tokens:
        assert tokens is None or PENDING_TOKEN not in tokens


def mixed_requests(parts: tuple[torch.nn.Module, Any]) -> list[tuple[list[int], SamplingParams]]:
    """Greedy of several lengths, a stop token hit mid-way, a stop string, n=2 seeded sampling, logprobs,
    penalties (the async engine reads those rows' history on the host) and min_tokens."""
    engine = make_engine(parts, False)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref = run(engine, [(PROMPTS[0], greedy)])[0]
    ids, text = ref.token_ids[0], ref.text[0]
    stop_id = next(t for k, t in enumerate(ids) if k >= 4 and t not in ids[:k])
    stop_str = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop_str.strip(), f"pick another prompt: no usable stop string in {text!r}"
    return [
        (PROMPTS[0], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop_id])),
        (PROMPTS[0], SamplingParams(max_tokens=16, temperature=0, stop=[stop_str])),
        (PROMPTS[1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
        (PROMPTS[2], SamplingParams(max_tokens=12, temperature=1.0, seed=11, n=2, logprobs=2)),
        (PROMPTS[3], SamplingParams(max_tokens=9, temperature=0.8, top_k=20, top_p=0.9, seed=5)),
        (PROMPTS[4], SamplingParams(max_tokens=7, temperature=0, repetition_penalty=1.3, ignore_eos=True)),
        (PROMPTS[5], SamplingParams(max_tokens=10, temperature=0, min_tokens=4, stop_token_ids=[stop_id])),
        (PROMPTS[1], SamplingParams(max_tokens=1, temperature=0)),
    ]


def assert_same(a: dict[int, Stream], b: dict[int, Stream]) -> None:
    for i in a:
        assert a[i] == b[i], f"request {i} differs with async scheduling"


def test_mixed_batch_identical(parts: tuple[torch.nn.Module, Any]) -> None:
    requests = mixed_requests(parts)
    sync = run(make_engine(parts, False), requests)
    asyn = run(make_engine(parts, True), requests)
    assert_same(sync, asyn)
    assert sync[0].finish[0][0] == "stop" and len(sync[0].token_ids[0]) < 16, "the stop token hit mid-way"
    assert sync[1].finish[0][0] == "stop" and isinstance(sync[1].finish[0][1], str), "the stop string hit"
    assert sync[2].finish[0] == ("length", None) and len(sync[2].token_ids[0]) == 3
    assert set(sync[3].token_ids) == {0, 1} and len(sync[3].logprobs[0]) == len(sync[3].token_ids[0])


def test_stop_runs_one_extra_token_that_nobody_sees(parts: tuple[torch.nn.Module, Any]) -> None:
    requests = mixed_requests(parts)[:1]
    engine = make_engine(parts, True)
    stream = run(engine, requests)[0]
    stop_id = requests[0][1].stop_token_ids[0]
    assert stream.token_ids[0][-1] == stop_id and stop_id not in stream.token_ids[0][:-1]
    assert stream.finish[0] == ("stop", stop_id)
    # One step per generated token plus the one launched before the stop was read.
    assert engine.stats.num_steps == len(stream.token_ids[0]) + 1
    assert engine.stats.num_generated_tokens == len(stream.token_ids[0])


def test_preemption_with_a_tiny_pool(parts: tuple[torch.nn.Module, Any]) -> None:
    requests = [(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)) for p in PROMPTS]
    overrides = ("cache.num_blocks=12", "cache.block_size=8")
    engines = [make_engine(parts, False, *overrides), make_engine(parts, True, *overrides)]
    sync, asyn = (run(e, requests) for e in engines)
    assert_same(sync, asyn)
    assert engines[0].stats.num_preemptions > 0 and engines[1].stats.num_preemptions > 0


def test_chunked_prefill_with_a_small_budget(parts: tuple[torch.nn.Module, Any]) -> None:
    requests = [(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)) for p in PROMPTS]
    overrides = ("scheduler.max_num_batched_tokens=16",)
    sync = run(make_engine(parts, False, *overrides), requests)
    asyn = run(make_engine(parts, True, *overrides), requests)
    assert_same(sync, asyn)
    assert all(len(s.token_ids[0]) == 6 for s in asyn.values())


def test_abort_mid_stream(parts: tuple[torch.nn.Module, Any]) -> None:
    requests = [(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in PROMPTS[:3]]
    full = run(make_engine(parts, False), requests)
    abort_after = {0: 4, 2: 1}
    sync = run(make_engine(parts, False), requests, abort_after)
    asyn = run(make_engine(parts, True), requests, abort_after)
    for streams in (sync, asyn):
        for i, k in abort_after.items():
            assert streams[i].finish[0] == ("abort", None)
            got = streams[i].token_ids[0]
            assert k <= len(got) < 12 and got == full[i].token_ids[0][: len(got)]
        assert streams[1] == full[1]


def test_default_follows_the_device(parts: tuple[torch.nn.Module, Any]) -> None:
    model, tokenizer = parts
    engine = LLM(
        copy.deepcopy(model), config=load_config(None, ["compile.backend=eager"]), tokenizer=tokenizer
    ).engine
    assert engine.async_scheduling is False  # the CPU: nothing to overlap with
    with pytest.raises(Exception, match="async_scheduling"):
        load_config(None, ["scheduler.async_scheduling=maybe"])


def test_padded_decode_buckets_get_the_device_side_ids(parts: tuple[torch.nn.Module, Any]) -> None:
    """Decode steps through the bucket path (CUDA graphs' static inputs, unreplayed on the CPU): the static
    input_ids take the ids the previous step sampled on the device."""
    requests = [
        (p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for p, n in zip(PROMPTS, (9, 3, 6))
    ]
    streams = []
    for async_on in (False, True):
        engine = make_engine(parts, async_on)
        engine.runner.enable_decode_graphs([1, 2, 4], engine.max_model_len, capture=False)
        streams.append(run(engine, requests))
        assert engine.runner.decode_graphs is not None and engine.runner.decode_graphs.num_replays >= 7
    assert_same(*streams)


def test_length_limit_runs_no_extra_token(parts: tuple[torch.nn.Module, Any]) -> None:
    """The host knows max_tokens ahead: a sequence whose pending token is its last is not scheduled again."""
    engine = make_engine(parts, True)
    stream = run(engine, [(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))])[0]
    assert len(stream.token_ids[0]) == 5 and stream.finish[0] == ("length", None)
    assert engine.stats.num_steps == 5
