"""Output kinds through the engine (issue 11: per-step output copies) and stop conditions end to end.

A tiny random Llama with SmolLM2's vocabulary and tokenizer, so text, logprobs and stop strings are real.
DELTA outputs carry only what is new and fold up to exactly the CUMULATIVE ones; FINAL_ONLY emits once.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import torch
from server_fixtures import uvicorn_on_loopback
from smollm2_tokenizer import smollm2_tokenizer
from transformers import LlamaForCausalLM

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models.presets import preset_config
from fxllm.runtime.engine import Engine
from fxllm.runtime.outputs import RequestOutput
from fxllm.runtime.sampling_params import RequestOutputKind, SamplingParams
from fxllm.serve.server import create_app

PROMPTS = [[1, 22, 333, 4444], [5, 6, 7, 8, 9, 10, 11, 12, 13], [20000, 30000]]
SAMPLED = dict(temperature=0.8, seed=7, n=2, max_tokens=24, logprobs=2, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    """tiny-llama's shape with SmolLM2's 49,152-token vocabulary and its (fast) tokenizer; eager."""
    tokenizer = smollm2_tokenizer()
    config = copy.deepcopy(preset_config("tiny-llama"))
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LLM(model, config=load_config(None, ["compile.backend=eager"]), tokenizer=tokenizer)


def run(engine: Engine, params: SamplingParams) -> list[list[RequestOutput]]:
    """Every output of every step, per prompt, as the async engine would publish them."""
    ids = [engine.add_request(p, params) for p in PROMPTS]
    seen: dict[str, list[RequestOutput]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(out)
    return [seen[i] for i in ids]


def summary(out: RequestOutput) -> list[tuple[Any, ...]]:
    """What a client reads of an output, comparable across kinds."""
    return [
        (c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.cumulative_logprob,
         [{t: (lp.logprob, lp.decoded) for t, lp in entry.items()} for entry in c.logprobs or []])
        for c in out.outputs
    ]  # fmt: skip


def folded(deltas: list[RequestOutput]) -> RequestOutput:
    """The deltas added up with RequestOutput.add."""
    total = RequestOutput(deltas[0].request_id, deltas[0].prompt, deltas[0].prompt_token_ids, [], False)
    for delta in deltas:
        total.add(delta)
    return total


def middle_stop(text: str, length: int = 6) -> tuple[int, str]:
    """(where, stop string): `length` characters from the middle of `text`, first found where they are."""
    cut = len(text) // 2
    while text.find(text[cut : cut + length]) != cut:
        cut += 1
    return cut, text[cut : cut + length]


def kind(name: str, **kwargs: Any) -> SamplingParams:
    """SamplingParams with the given output kind."""
    return SamplingParams(output_kind=RequestOutputKind[name], **kwargs)


def test_delta_outputs_carry_only_the_new_and_fold_up_to_cumulative(llm: LLM) -> None:
    cumulative = run(llm.engine, kind("CUMULATIVE", **SAMPLED))
    deltas = run(llm.engine, kind("DELTA", **SAMPLED))
    for cum, delta in zip(cumulative, deltas):
        assert len(cum) == len(delta) == SAMPLED["max_tokens"]  # one output per step
        for k, out in enumerate(delta):
            # One new token per sequence per step (no history), and the prompt list is shared, not copied.
            assert [len(c.token_ids) for c in out.outputs] == [1, 1]
            assert all(len(c.logprobs or []) == 1 for c in out.outputs)
            assert out.prompt_token_ids is delta[0].prompt_token_ids
            before = cum[k - 1].outputs if k else None
            for c, now in zip(out.outputs, cum[k].outputs):
                assert c.text == now.text[len(before[c.index].text) if before else 0 :]
                assert c.token_ids == now.token_ids[-1:]
        assert delta[-1].finished and not any(d.finished for d in delta[:-1])
        assert summary(folded(delta)) == summary(cum[-1])
        assert cum[-1].outputs[0].text  # the comparison saw real text


def test_final_only_emits_once(llm: LLM) -> None:
    cumulative = run(llm.engine, kind("CUMULATIVE", **SAMPLED))
    final_only = run(llm.engine, kind("FINAL_ONLY", **SAMPLED))
    for cum, final in zip(cumulative, final_only):
        assert len(final) == 1 and final[0].finished
        assert summary(final[0]) == summary(cum[-1])
        assert final[0].prompt_token_ids == cum[-1].prompt_token_ids


def test_delta_lists_only_sequences_with_news(llm: LLM) -> None:
    # Sequence 0 stops on its 3rd token (a stop token id); sequence 1 goes on: later deltas hold only it.
    probe = run(llm.engine, kind("CUMULATIVE", **SAMPLED))[0][-1]
    first = probe.outputs[0].token_ids
    stop_at = next(i for i in range(2, len(first)) if first[i] not in first[:i] + probe.outputs[1].token_ids)
    params = kind("DELTA", **{**SAMPLED, "stop_token_ids": [first[stop_at]]})
    deltas = run(llm.engine, params)[0]
    indices = [[c.index for c in d.outputs] for d in deltas]
    assert indices[: stop_at + 1] == [[0, 1]] * (stop_at + 1)
    assert all(i == [1] for i in indices[stop_at + 1 :]) and len(indices) > stop_at + 1
    assert deltas[stop_at].outputs[0].finish_reason == "stop"
    assert deltas[stop_at].outputs[0].stop_reason == first[stop_at]


def test_stop_strings_and_stop_tokens_end_to_end(llm: LLM) -> None:
    greedy = dict(temperature=0.0, max_tokens=32, ignore_eos=True)
    base = llm.generate([PROMPTS[0]], SamplingParams(**greedy))[0].outputs[0]
    text, tokens = base.text, base.token_ids
    cut, stop = middle_stop(text)  # it spans token boundaries
    rng = random.Random(0)
    many = [s for s in {"".join(rng.choices("QXZ#@0123456789", k=8)) for _ in range(60_000)} if s not in text]
    cases = [
        (dict(stop=[stop]), text[:cut]),
        (dict(stop=[stop], include_stop_str_in_output=True), text[: cut + 6]),
        (dict(stop=[*many[:30_000], stop, *many[30_000:]]), text[:cut]),  # the same with 60,000 strings
    ]
    for extra, expected in cases:
        for name in ("CUMULATIVE", "DELTA"):
            out = llm.generate([PROMPTS[0]], kind(name, **greedy, **extra))[0].outputs[0]
            assert (out.text, out.finish_reason, out.stop_reason) == (expected, "stop", stop)
            assert out.token_ids == tokens[: len(out.token_ids)]
        streamed = run(llm.engine, kind("DELTA", **greedy, **extra))[0]
        assert "".join(c.text for d in streamed for c in d.outputs) == expected  # nothing cut was streamed
    # A stop token id: it ends the sequence, is counted, and its text is not in the output.
    at = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    out = llm.generate([PROMPTS[0]], SamplingParams(**greedy, stop_token_ids=[tokens[at]]))[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (tokens[: at + 1], "stop", tokens[at])
    assert text.startswith(out.text)


def test_async_generate_folds_what_queued_up(llm: LLM) -> None:
    """A consumer that falls behind gets one folded DELTA output (or the latest snapshot), not a backlog."""
    greedy = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    params_of = {name: kind(name, **greedy) for name in ("DELTA", "CUMULATIVE")}
    expected = llm.generate([PROMPTS[1]], params_of["CUMULATIVE"])[0]

    async def consume(name: str) -> list[RequestOutput]:
        outs = []
        request_id = f"lagging-{name}"
        async for out in llm.generate_async(PROMPTS[1], params_of[name], request_id=request_id):
            outs.append(out)
            if len(outs) == 1:  # fall behind until the other 15 steps' outputs wait in the request's queue
                # (not until the request leaves the engine: the engine thread publishes a step's outputs
                # after the step, so the last one can still be on its way then; a lagging run saw 3 outputs)
                engine = llm.async_engine()
                deadline = time.monotonic() + 60
                while engine.queued(request_id) < 15 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert engine.queued(request_id) == 15 and engine.queued("no-such-request") == 0
        return outs

    async def final_only() -> list[RequestOutput]:
        return [out async for out in llm.generate_async(PROMPTS[1], params_of["DELTA"], stream=False)]

    try:
        delta = asyncio.run(consume("DELTA"))
        cumulative = asyncio.run(consume("CUMULATIVE"))
        finals = asyncio.run(final_only())
    finally:
        llm.shutdown()
    assert len(delta) == 2 and len(cumulative) == 2  # the first output, then everything else at once
    assert [len(o.outputs[0].token_ids) for o in delta] == [1, 15]
    assert summary(folded(delta)) == summary(expected) == summary(cumulative[-1])
    assert len(finals) == 1 and summary(finals[0]) == summary(expected)  # stream=False: FINAL_ONLY


@contextmanager
def serving(llm: LLM) -> Iterator[str]:
    """The OpenAI server over `llm` on a free loopback port; stops it and the async engine after."""
    try:
        with uvicorn_on_loopback(create_app(llm, llm.config)) as url:
            yield url
    finally:
        llm.shutdown()


def test_server_streams_deltas_with_stop_strings(llm: LLM) -> None:
    """The server streams DELTA outputs: same text as the engine, absolute logprob offsets, usage counted."""
    greedy = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    text = llm.generate([PROMPTS[0]], SamplingParams(**greedy))[0].outputs[0].text
    _, stop = middle_stop(text)
    want = llm.generate([PROMPTS[0]], SamplingParams(**greedy, stop=[stop]))[0].outputs[0]
    tokens = llm.generate([PROMPTS[0]], SamplingParams(**greedy))[0].outputs[0].token_ids
    at = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    body = {"prompt": PROMPTS[0], **greedy, "stop": [stop], "logprobs": 1, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    with serving(llm) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        final = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "prompt": PROMPTS[0], **greedy, "stop_token_ids": [tokens[at]]}).json()  # fmt: skip
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    sent = 0
    for choice in choices:
        if choice["logprobs"] and choice["logprobs"]["text_offset"]:
            assert choice["logprobs"]["text_offset"][0] == sent  # counted from the start of the text
        sent += len(choice["text"])
    assert "".join(c["text"] for c in choices) == want.text
    assert (choices[-1]["finish_reason"], choices[-1]["stop_reason"]) == ("stop", stop)
    assert sum(len(c["logprobs"]["tokens"]) for c in choices if c["logprobs"]) == len(want.token_ids)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == len(want.token_ids)
    assert chunks[-1]["usage"]["prompt_tokens"] == len(PROMPTS[0])
    # Not streamed: the engine sends only the final output; a stop token id is the stop reason.
    assert (final["choices"][0]["finish_reason"], final["choices"][0]["stop_reason"]) == ("stop", tokens[at])
    assert final["usage"]["completion_tokens"] == at + 1
