"""`fxllm serve` builds its engine under higher garbage-collector thresholds and serves under the previous
ones (issue 13: fewer full collections over the start's millions of long-lived objects)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fxllm.llm
import fxllm.serve.server
from fxllm.runtime.gc_heap import STARTUP_THRESHOLDS, startup_gc
from fxllm.serve.serve_cli import serve_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    """The process's thresholds, restored after the test."""
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


def test_thresholds_are_raised_inside_and_restored_after(thresholds: tuple[int, int, int]) -> None:
    gc.set_threshold(700, 10, 10)
    with startup_gc():
        assert gc.get_threshold() == STARTUP_THRESHOLDS
    assert gc.get_threshold() == (700, 10, 10)
    gc.set_threshold(50_000, 5, 1_000)  # a user's higher ones are never lowered
    with startup_gc():
        assert gc.get_threshold() == (50_000, 50, 1_000)
    assert gc.get_threshold() == (50_000, 5, 1_000)
    gc.set_threshold(0)  # automatic collection off stays off
    with startup_gc():
        assert gc.get_threshold()[0] == 0
    with pytest.raises(RuntimeError), startup_gc():
        gc.set_threshold(700, 10, 10)  # restored on an error too, whatever happened inside
        raise RuntimeError
    assert gc.get_threshold()[0] == 0


def test_serve_builds_the_engine_under_startup_thresholds_and_serves_under_the_defaults(
    thresholds: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.set_threshold(700, 10, 10)
    seen: dict[str, object] = {}

    class FakeLLM:
        def __init__(self, model: str, config: Any, serving: bool = False) -> None:
            seen["build"] = gc.get_threshold()
            seen["serving"] = serving  # the server's batch limits
            self.engine = type("Engine", (), {"runner": None})()

    monkeypatch.setattr(fxllm.llm, "LLM", FakeLLM)
    monkeypatch.setattr(
        fxllm.serve.server, "run_server", lambda llm, config: seen.update(serve=gc.get_threshold())
    )
    assert serve_main(["tiny-llama"]) == 0
    assert seen == {"build": STARTUP_THRESHOLDS, "serve": (700, 10, 10), "serving": True}


_PROBE = """
import gc, json, sys
seen = set()
class Spy:  # the collector's thresholds whenever torch or the server stack imports a module
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "fastapi", "uvicorn"):
            seen.add(gc.get_threshold())
sys.meta_path.insert(0, Spy())
gc.set_threshold(700, 10, 10)
{entry}
print(json.dumps({{"seen": sorted(seen), "after": gc.get_threshold(), "torch": "torch" in sys.modules}}))
"""
ENTRIES = {
    # `fxllm serve --help`: the console script imports the server stack, then serve's parser exits.
    "console script": "import fxllm.serve.cli as cli\ntry:\n    cli.main(['serve', '--help'])\nexcept SystemExit:\n"
    "    pass",
    "python -m fxllm.serve": "import fxllm.serve.__main__",
}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_the_entry_points_import_torch_and_the_server_under_startup_thresholds(entry: str) -> None:
    code = _PROBE.format(entry=ENTRIES[entry])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["torch"], result  # the probe saw the entry point import torch
    assert result["seen"] == [list(STARTUP_THRESHOLDS)]
    assert result["after"] == [700, 10, 10]
