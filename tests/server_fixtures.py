"""Shared by the server hardening tests: a tiny model with a real byte-level BPE tokenizer, served by uvicorn
on a loopback port in a thread, with its logs propagating to the root logger (so caplog sees uvicorn's)."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fxllm.config import config_from_dict
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.serve.server import create_app

MODEL = "tiny-llama"  # vocab 512, pad 0, bos 1, eos 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lossless byte-level BPE tokenizer with tiny-llama's 512 ids, trained in a blink on a toy corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    corpus = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8)) for i in range(200)]
    tok.train_from_iterator(corpus, trainer)
    assert tok.token_to_id("</s>") == 2 and tok.get_vocab_size() <= 512
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llm(**sections: dict[str, Any]) -> LLM:
    """tiny-llama (eager) with the toy tokenizer; `sections` are merged into the config tree."""
    tree: dict[str, Any] = {"model": {"model": MODEL}, "compile": {"backend": "eager"},
                            "cache": {"cpu_kv_bytes": 16 << 20}}  # fmt: skip
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return LLM(load_model(MODEL).model, config=config_from_dict(tree), tokenizer=tiny_tokenizer())


@dataclass
class Served:
    """A running server: its base URL, the app and the LLM behind it."""

    url: str
    app: FastAPI
    llm: LLM


@contextmanager
def uvicorn_on_loopback(app: FastAPI, *, quiet: bool = True, name: str = "test-uvicorn") -> Iterator[str]:
    """Run `app` with uvicorn in a daemon thread on a free loopback port; yields its base URL, stops it after.

    `quiet`: uvicorn logs warnings only; otherwise its logs propagate to the root logger (caplog sees them)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    logging = {"log_level": "warning"} if quiet else {"log_config": None}
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, **logging))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def serve(llm: LLM) -> Iterator[Served]:
    """Serve `llm` (its config's server section) on a free loopback port until the block ends, then shut it down."""
    app = create_app(llm, llm.config)
    try:
        with uvicorn_on_loopback(app, quiet=False) as url:
            yield Served(url, app, llm)
    finally:
        llm.shutdown()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    """The median of `repeats` timed calls (a warm, idle baseline)."""
    return statistics.median(timed(fn) for _ in range(repeats))


def complete(url: str, prompt: Any, max_tokens: int, timeout: float = 60.0, **fields: Any) -> httpx.Response:
    """POST /v1/completions (greedy, EOS ignored so the length is exact) and check it succeeded."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **fields}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)
    assert resp.status_code == 200, resp.text
    return resp


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The response is an OpenAI-shaped error with this status (and param); returns its `error` object."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]
