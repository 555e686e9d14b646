"""fxllm's C++ CPU kernels built in a background thread (a cold start's `native.start_background_build`):
started only when the library is not on disk, usable after the join, a failure raised at the join with the
compiler's message."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fxllm.backends.cpu import native

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: the library's name can be loaded once per process, and this one may have loaded it.
_CHILD = textwrap.dedent(
    """
    import torch
    from fxllm.backends.cpu import native

    assert not native.is_built()
    build = native.start_background_build()
    assert build is not None
    assert native.start_background_build() is None  # one build at a time
    argmax = native.op("argmax_rows")  # joins the thread
    assert argmax is not None and not build.thread.is_alive() and build.error is None
    logits = torch.randn(5, 300)
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))
    assert native.is_built() and native.start_background_build() is None
    print("ok", native.build_directory())
    """
)


@pytest.mark.slow  # a full g++ build where the usual build's objects came from another checkout's path
def test_background_build_gives_usable_kernels(tmp_path: Path) -> None:
    """A fresh cache root: the thread builds the library (linking the usual build's objects where this machine
    has them and they were built from this checkout's path, ninja then only links), op() joins it, and the
    kernel computes argmax."""
    usual = native.build_directory()
    env = {**os.environ, "FXLLM_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    fresh = Path(
        subprocess.run(
            [sys.executable, "-c", "from fxllm.backends.cpu import native; print(native.build_directory())"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    if usual.is_dir():
        fresh.mkdir(parents=True)
        for item in usual.iterdir():
            if item.suffix != ".so" and item.is_file():
                shutil.copy2(item, fresh / item.name)
    result = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True)
    if result.returncode != 0 and "not found" in result.stderr and "g++" in result.stderr:
        pytest.skip("no C++ compiler here")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", str(fresh)]


def test_no_background_build_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm start: the library is on disk, so no thread starts (and cpp_extension is not imported for it)."""
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_background", None)
    monkeypatch.setattr(native, "is_built", lambda: True)
    assert native.start_background_build() is None


def test_a_failed_background_build_raises_at_the_join(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No compiler: join() raises NativeBuildError with the compiler's message."""
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", None)  # as in a fresh process (restored after the test)
    monkeypatch.setattr(native, "_background", None)
    build = native.start_background_build()
    assert build is not None
    with pytest.raises(native.NativeBuildError, match="/nonexistent/g\\+\\+: not found"):
        build.join()


def test_available_logs_a_failed_background_build(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """available() joins the failed thread, logs its message once and is False, so the references run."""

    def failing_build(jobs: int | None = None) -> None:
        raise RuntimeError("Error building extension 'fxllm_cpu_kernels': ops.cpp:1: error: boom")

    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_background", None)
    monkeypatch.setattr(native, "is_built", lambda: False)
    monkeypatch.setattr(native, "_load", failing_build)
    assert native.start_background_build() is not None
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available() and not native.available()
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == native.__name__
    ]
    assert len(warnings) == 1 and "ops.cpp:1: error: boom" in warnings[0]
    assert native._background is None
