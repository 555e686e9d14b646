"""Issue 12, items 2, 3, 4 and 6: hostile JSON, uploads cut short, big prompts, content types, CORS."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_fixtures import Served, assert_error, complete, median_time, serve, timed, tiny_llm

from fxllm.serve.prompts import longest_token_bytes

# /health while four big prompts are refused: its median latency within FACTOR of the idle median, or
# FLOOR_S on a loaded 2-core box (the median, because single probes spike there whatever the server does).
# Tokenizing one such prompt on the event loop took 1.5-2 s here: /health used to wait for each in turn.
FACTOR, FLOOR_S = 5.0, 0.75
BIG = "the quick brown fox " * 45_000  # 900 KB: under server.max_request_bytes, far past the context


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """tiny-llama (512-token context) with the default server limits."""
    with serve(tiny_llm()) as s:
        yield s


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, dict[str, Any], str | None]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read()), resp.getheader("connection")


HOSTILE = [
    ("int_past_digit_limit", b'{"prompt": "hi", "max_tokens": ' + b"7" * 5001 + b"}", "invalid_json"),
    ("nested_1000_deep", b'{"prompt": "hi", "user": ' + b"[" * 1000 + b"]" * 1000 + b"}", "invalid_json"),
    ("nested_past_max_json_depth", b'{"prompt": "hi", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "invalid_json"),
]


@pytest.mark.parametrize(("body", "code"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_json_is_a_400_and_the_connection_stays_usable(
    served: Served, body: bytes, code: str | None
) -> None:
    conn = http.client.HTTPConnection(served.url.removeprefix("http://"), timeout=30)
    try:
        status, error, connection = _post(conn, "/v1/completions", body)
        assert status == 400, error
        assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["code"] == code
        assert connection != "close" and conn.sock is not None
        sock = conn.sock
        good = json.dumps({"prompt": "the fox", "max_tokens": 1}).encode()
        status, out, _ = _post(conn, "/v1/completions", good)
        assert status == 200 and out["usage"]["completion_tokens"] == 1
        assert conn.sock is sock, "the server closed the keep-alive connection"
    finally:
        conn.close()


def test_client_disconnecting_mid_upload_logs_one_info_line(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                "Content-Length: 100000\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + b'{"prompt": "' + b"x" * 5000)
    for _ in range(500):  # up to ~5 s for the server to notice
        if any("disconnected while sending" in r.getMessage() for r in caplog.records):
            break
        time.sleep(0.01)
    time.sleep(0.2)  # let anything the disconnect might still log arrive
    lines = [r for r in caplog.records if "disconnected while sending" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _health_during(url: str, bodies: list[tuple[str, dict[str, Any]]]) -> tuple[float, list[httpx.Response]]:
    """The median /health latency while `bodies` are posted concurrently, and their responses."""
    responses: list[httpx.Response] = []
    encoded = [(path, json.dumps(body).encode()) for path, body in bodies]  # not in the timed window

    def post(path: str, content: bytes) -> None:
        headers = {"Content-Type": "application/json"}
        responses.append(httpx.post(f"{url}{path}", content=content, headers=headers, timeout=120))

    threads = [threading.Thread(target=post, args=b, daemon=True) for b in encoded]
    for t in threads:
        t.start()
    probes = []
    for _ in range(3000):  # bounded: the posts finish within seconds
        if not any(t.is_alive() for t in threads):
            break
        probes.append(timed(lambda: httpx.get(f"{url}/health", timeout=30)))
    for t in threads:
        t.join(timeout=120)
    return statistics.median(probes or [0.0]), responses


def test_big_prompts_are_refused_by_bytes_without_stalling_the_loop(served: Served) -> None:
    limit = served.llm.engine.max_model_len * longest_token_bytes(served.llm.tokenizer)
    assert served.app.state.serving.prompts.max_bytes == limit < len(BIG)
    idle = median_time(lambda: httpx.get(f"{served.url}/health"), repeats=5)
    chat = {"messages": [{"role": "user", "content": BIG}]}
    bodies = [("/v1/completions", {"prompt": BIG})] * 3 + [("/v1/chat/completions", chat)]
    typical, responses = _health_during(served.url, bodies)
    assert typical < max(FACTOR * idle, FLOOR_S), (typical, idle)
    assert len(responses) == 4
    for resp in responses:
        error = assert_error(resp, 400)
        assert error["param"] in ("prompt", "messages") and "server.max_prompt_bytes" in error["message"]


def test_tokenizing_runs_off_the_event_loop() -> None:
    """With the byte check off, 900 KB prompts are tokenized (on worker threads) and refused by length."""
    with serve(tiny_llm(server={"max_prompt_bytes": 4 << 20})) as s:
        idle = median_time(lambda: httpx.get(f"{s.url}/health"), repeats=5)
        typical, responses = _health_during(s.url, [("/v1/completions", {"prompt": BIG})] * 4)
        assert typical < max(FACTOR * idle, FLOOR_S), (typical, idle)
        for resp in responses:
            assert "tokens but this model's context" in assert_error(resp, 400, "prompt")["message"]
        complete(s.url, "the quick brown fox", 2)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])  # fmt: skip
def test_post_requires_application_json(served: Served, content_type: str | None) -> None:
    body = json.dumps({"prompt": "the fox", "max_tokens": 1}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/completions", "/v1/chat/completions"):
        error = assert_error(httpx.post(f"{served.url}{path}", content=body, headers=headers), 415)
        assert error["code"] == "unsupported_media_type"
    ok = httpx.post(f"{served.url}/v1/completions", content=body,
                    headers={"Content-Type": "application/json; charset=utf-8"})  # fmt: skip
    assert ok.status_code == 200, ok.text


def test_no_permissive_cors(served: Served) -> None:
    origin = {"Origin": "https://evil.example"}
    preflight = httpx.options(f"{served.url}/v1/completions", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})  # fmt: skip
    assert "access-control-allow-origin" not in preflight.headers
    resp = httpx.post(
        f"{served.url}/v1/completions", json={"prompt": "the fox", "max_tokens": 1}, headers=origin
    )
    assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers
