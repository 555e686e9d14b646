"""OpenAI-compatible server: one real uvicorn server on loopback, driven by the official openai client."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from server_fixtures import uvicorn_on_loopback

from fxllm.config import FxllmConfig, config_from_dict
from fxllm.llm import LLM
from fxllm.models import LoadedModel
from fxllm.runtime.outputs import CompletionOutput
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.serve.server import create_app

MAX_TOKENS = 8
MODEL = "smollm2"
LAYERS = 4  # SmolLM2's first layers: see `served`
PROMPTS = [f"{i} plus {i} is" for i in range(64)]  # short: prefill dominates on a 2-core CPU
CHAT: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
MAX_REQUEST_BYTES = 64 * 1024


@dataclass
class Served:
    """The running server and what greedy decoding gave before it started."""

    url: str
    llm: LLM
    config: FxllmConfig
    expected: dict[str, str]
    expected_chat: CompletionOutput

    def client(self) -> openai.OpenAI:
        """A sync openai client for this server."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


def _config(**server: Any) -> FxllmConfig:
    return config_from_dict({
        "compile": {"backend": "eager"},
        # SmolLM2's pool of 128 MiB over 30 layers, over LAYERS: the same ~2,900 tokens, so the same context limit.
        "cache": {"cpu_kv_bytes": (128 << 20) * LAYERS // 30},
        "scheduler": {"max_num_seqs": 64},
        "server": {"max_request_bytes": MAX_REQUEST_BYTES, **server},
    })  # fmt: skip


@pytest.fixture(scope="module")
def served(smollm2_short: LoadedModel) -> Iterator[Served]:
    """Load smollm2, record greedy answers with the sync API, then serve it on a free loopback port.

    SmolLM2's first LAYERS layers (its real weights, vocabulary and chat template): every test compares the
    server with the LLM API on the same engine, so depth adds nothing but 7x the capture and step time."""
    config = _config()
    assert config.model.model == MODEL  # the name the server serves
    assert smollm2_short.config.num_hidden_layers == LAYERS  # shared per session (conftest.py)
    llm = LLM(copy.deepcopy(smollm2_short.model), config=config, tokenizer=smollm2_short.tokenizer)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    expected = {p: o.outputs[0].text for p, o in zip(PROMPTS, llm.generate(PROMPTS, greedy))}
    expected_chat = llm.chat(CHAT, greedy)[0].outputs[0]
    try:
        with uvicorn_on_loopback(create_app(llm, config)) as url:
            yield Served(url, llm, config, expected, expected_chat)
    finally:
        llm.shutdown()


def _assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ---- happy paths -------------------------------------------------------------------------------


def test_health_version_models(served: Served) -> None:
    assert httpx.get(f"{served.url}/health").status_code == 200
    assert httpx.get(f"{served.url}/version").json() == {"version": "0.1.0"}
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (
        httpx.get(f"{served.url}/v1/models/{MODEL}").json()["max_model_len"]
        == served.llm.engine.max_model_len
    )


def test_completion_matches_llm(served: Served) -> None:
    out = served.client().completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
    )
    assert out.object == "text_completion"
    assert out.choices[0].text == served.expected[PROMPTS[0]]
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == MAX_TOKENS
    assert out.usage.total_tokens == out.usage.prompt_tokens + MAX_TOKENS


def test_completion_stream_matches_llm(served: Served) -> None:
    stream = served.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == served.expected[PROMPTS[1]]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_completion_prompt_batch(served: Served) -> None:
    out = served.client().completions.create(
        model=MODEL, prompt=PROMPTS[2:4], max_tokens=MAX_TOKENS, temperature=0
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [served.expected[p] for p in PROMPTS[2:4]]


def test_chat_matches_llm(served: Served) -> None:
    client, want = served.client(), served.expected_chat
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    assert out.choices[0].finish_reason == want.finish_reason
    alias = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0
    )
    assert alias.choices[0].message.content == want.text
    assert alias.usage is not None and alias.usage.completion_tokens == len(want.token_ids)


def test_chat_stream_matches_llm(served: Served) -> None:
    want = served.expected_chat
    stream = served.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_logprobs_and_n(served: Served) -> None:
    client = served.client()
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert content is not None and len(content) == 3
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    assert content[0].token == content[0].top_logprobs[0].token  # greedy picks the most likely token
    comp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert lp is not None and len(lp.tokens or []) == 3 and len(lp.token_logprobs or []) == 3
    assert "".join(lp.tokens or []) == comp.choices[0].text
    many = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=4, n=3, temperature=1.0, seed=1
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert many.usage is not None and many.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=3, n=2, temperature=0, stream=True
    )
    texts, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finished |= {choice.index} if choice.finish_reason else set()
    assert finished == {0, 1} and texts[0] == texts[1] != ""  # greedy: both choices agree


def test_64_concurrent_streams(served: Served) -> None:
    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True)  # fmt: skip
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    texts = asyncio.run(main())
    mismatched = [(p, t) for p, t in zip(PROMPTS, texts) if t != served.expected[p]]
    assert not mismatched, mismatched[:3]


# ---- bad input ---------------------------------------------------------------------------------

_CHAT = "/v1/chat/completions"
_COMP = "/v1/completions"
_MSG = [{"role": "user", "content": "hi"}]
BAD: list[tuple[str, str, Any, int, str | None]] = [
    ("malformed_json", _CHAT, b'{"model": "smollm2", "messages": [', 400, None),
    ("not_an_object", _CHAT, b"[1, 2]", 400, None),
    ("invalid_utf8", _COMP, b'{"prompt": "\xff\xfe"}', 400, None),
    ("oversized", _COMP, {"prompt": "x" * (MAX_REQUEST_BYTES + 10)}, 413, None),
    ("wrong_type_max_tokens", _COMP, {"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ("wrong_type_temperature", _CHAT, {"messages": _MSG, "temperature": "hot"}, 400, "temperature"),
    ("wrong_type_content", _CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("missing_messages", _CHAT, {"model": MODEL}, 400, "messages"),
    ("empty_messages", _CHAT, {"messages": []}, 400, "messages"),
    ("unknown_role", _CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("max_tokens_zero", _COMP, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens_negative", _CHAT, {"messages": _MSG, "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens_past_context", _CHAT, {"messages": _MSG, "max_tokens": 100_000}, 400, "max_tokens"),
    ("prompt_past_context", _COMP, {"prompt": "hello " * 3000}, 400, "prompt"),
    ("n_too_large", _CHAT, {"messages": _MSG, "n": 17}, 400, "n"),
    ("top_p_out_of_range", _COMP, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("unknown_model", _CHAT, {"model": "gpt-4o", "messages": _MSG}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_then_good_one(
    served: Served, path: str, body: Any, status: int, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(f"{served.url}{path}", content=content, headers={"Content-Type": "application/json"})
    error = _assert_error(resp, status, param)
    if status == 404:
        assert error["code"] == "model_not_found"
    ok = httpx.post(
        f"{served.url}{_COMP}", json={"prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0}, timeout=60
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_openai_client_sees_errors(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=0)
    assert "max_tokens" in bad.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


# ---- disconnects, auth, metrics ----------------------------------------------------------------


def _wait_idle(served: Served, baseline: int, timeout: float = 15.0) -> None:
    engine = served.llm.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.requests and engine.kv_cache.num_used_blocks == baseline:
            return
        time.sleep(0.05)
    raise AssertionError(
        f"not idle: requests {list(engine.requests)}, used blocks {engine.kv_cache.num_used_blocks}"
    )


def test_disconnect_aborts_and_frees_blocks(served: Served) -> None:
    engine = served.llm.engine
    _wait_idle(served, 0)  # cached prefix blocks are evictable, so an idle engine holds no used blocks
    aborted = engine.stats.num_aborted
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{served.url}{_COMP}", json=body, timeout=60) as resp:
        events = 0
        for line in resp.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    assert events == 3
    _wait_idle(served, 0)
    assert engine.stats.num_aborted == aborted + 1
    # A non-streaming request whose client gives up is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}{_COMP}", json={**body, "stream": False}, timeout=1.0)
    _wait_idle(served, 0)
    assert engine.stats.num_aborted == aborted + 2


def test_api_key(served: Served) -> None:
    app = create_app(served.llm, _config(api_key="s3cret"))

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fxllm") as client:
            assert (await client.get("/health")).status_code == 200
            _assert_error(await client.get("/v1/models"), 401)
            _assert_error(await client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
            body = {"prompt": "hi", "max_tokens": 1}
            _assert_error(await client.post(_COMP, json=body, headers={"Authorization": "Bearer nope"}), 401)
            good = {"Authorization": "Bearer s3cret"}
            assert (await client.get("/v1/models", headers=good)).status_code == 200
            resp = await client.post(_COMP, json=body, headers=good, timeout=60)
            assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 1

    asyncio.run(main())


def test_metrics(served: Served) -> None:
    served.client().completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=2, temperature=0)
    resp = httpx.get(f"{served.url}/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    for name in ("fxllm:http_requests_total", "fxllm:request_success_total", "fxllm:prompt_tokens_total",
                 "fxllm:generation_tokens_total", "fxllm:time_to_first_token_seconds_bucket",
                 "fxllm:inter_token_latency_seconds_bucket", "fxllm:e2e_request_latency_seconds_count",
                 "fxllm:kv_cache_usage_perc", "fxllm:prefix_cache_hit_rate", "fxllm:num_requests_running",
                 "fxllm:num_requests_waiting"):  # fmt: skip
        assert name in resp.text, name
    generated = [line for line in resp.text.splitlines() if line.startswith("fxllm:generation_tokens_total")]
    assert float(generated[0].split()[-1]) > 0


def test_bench_serve_against_server(served: Served, tmp_path: Any) -> None:
    from fxllm.serve.bench_serve import bench_serve_main

    out = tmp_path / "bench.json"
    argv = ["--url", served.url, "-n", "4", "--output-len", "3", "--input-len", "4", "--concurrency", "2",
            "--plot", str(tmp_path / "bench.png"), "--json", str(out)]  # fmt: skip
    assert bench_serve_main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["successful"] == 4 and summary["ttft_p50_ms"] > 0


def test_serve_cli_config(tmp_path: Any) -> None:
    from fxllm.serve.serve_cli import build_parser, config_from_args

    path = tmp_path / "config.yml"
    path.write_text("server:\n  port: 9000\n  max_n: 4\ncompile:\n  backend: eager\n")
    args = build_parser().parse_args(["smollm2", "-c", str(path), "--host", "0.0.0.0", "-o", "server.port=9100",
                                      "--api-key", "k"])  # fmt: skip
    config = config_from_args(args)
    assert (config.server.host, config.server.port, config.server.max_n) == ("0.0.0.0", 9100, 4)
    assert (
        config.server.api_key == "k" and config.model.model == "smollm2" and config.compile.backend == "eager"
    )
