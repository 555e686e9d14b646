"""Issue 12, item 5: on SIGTERM a real `python -m fxllm.serve` stops admitting, drains for
server.shutdown_drain_s, then ends each stream still running with an SSE error event and `[DONE]`
(a clean chunked close), logs one line with the count, and exits 0 without tracebacks."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

DRAIN_S = 1.0
STREAMS = 6
MAX_TOKENS = 480  # one sequence at a time: thousands of steps, far longer than the drain on any CPU


class Stream:
    """One streaming completion read on a thread: its `data:` payloads and any transport error."""

    def __init__(self, url: str, i: int) -> None:
        self.events: list[str] = []
        self.error: BaseException | None = None
        body = {"prompt": [3 + i, 5, 7], "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}

        def run() -> None:
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
                    assert resp.status_code == 200, resp.read()
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            self.events.append(line.removeprefix("data: "))
            except BaseException as exc:  # a truncated chunked body raises httpx.RemoteProtocolError
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _queued(url: str) -> bool:
    """Whether /metrics shows a sequence running and others waiting (tiny-llama has no tokenizer, so its
    streams send no text before they finish)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    gauges = dict(re.findall(r"^fxllm:num_requests_(running|waiting)\{[^}]*\} (\S+)$", text, re.MULTILINE))
    return float(gauges.get("running", 0)) >= 1 and float(gauges.get("waiting", 0)) >= 1


def test_sigterm_drains_then_ends_streams_with_an_error_event(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.yml"
    config.write_text(f"compile:\n  backend: eager\ncache:\n  cpu_kv_bytes: 16777216\nscheduler:\n  max_num_seqs: 1\n"
                      f"server:\n  port: {port}\n  shutdown_drain_s: {DRAIN_S}\n")  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fxllm.serve", "tiny-llama", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait(lambda: proc.poll() is not None or _up(url), 300, "the server to start")
        assert proc.poll() is None, log.read_text()
        streams = [Stream(url, i) for i in range(STREAMS)]
        _wait(lambda: _queued(url), 120, "one stream running and the others queued")
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                httpx.post(f"{url}/v1/completions", json={"prompt": [3], "max_tokens": 1}, timeout=5)
            except httpx.TransportError:
                return True
            return False

        _wait(refused, 5, "new connections to be refused")
        for stream in streams:
            stream.thread.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    cut = 0
    for stream in streams:
        assert not stream.thread.is_alive() and stream.error is None, (stream.error, output[-3000:])
        assert stream.events[-1] == "[DONE]", stream.events[-3:]
        if len(stream.events) >= 2 and "error" in (last := json.loads(stream.events[-2])):
            assert last["error"]["code"] == "server_shutting_down", last
            cut += 1
    assert cut >= STREAMS - 1, "the streams were not running at the end of the drain"
    lines = [line for line in output.splitlines() if "drain ended with" in line]
    assert len(lines) == 1 and f"with {cut} streams" in lines[0], output[-3000:]
    assert "Traceback" not in output and " ERROR " not in output, output[-3000:]
