"""The cache root is scoped to the engine being built: an engine without `compile.cache_dir` uses the user's
`$FXLLM_CACHE_DIR` (or ~/.cache/fxllm), never a root an earlier engine of the same process set, Inductor's and
Triton's caches follow the current engine's root, and a user's TORCHINDUCTOR_CACHE_DIR is never overwritten."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fxllm import LLM
from fxllm.compiler.cache import DEFAULT_ROOT, GraphCache, cache_root, current_root, use_cache_root

BASE = ["model.model=tiny-llama", "compile.backend=eager", "cache.num_blocks=64"]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No cache variable set by the user (conftest restores the environment after the test)."""
    for name in ("FXLLM_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FXLLM_NO_COMPILE_CACHE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_later_root_does_not_inherit_an_earlier_one(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FXLLM_CACHE_DIR: after a root X, cache_root() is still the default and the caches follow each root."""
    x = tmp_path / "x"
    use_cache_root(cache_root(str(x)))
    assert os.environ["FXLLM_CACHE_DIR"] == str(x) and current_root() == x
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(x / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(x / "triton")
    assert cache_root() == DEFAULT_ROOT.expanduser()  # before the fix: x, read back from our own variable

    use_cache_root(cache_root())
    assert current_root() == DEFAULT_ROOT.expanduser()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(DEFAULT_ROOT.expanduser() / "inductor")


def test_the_users_variables_stay_the_users(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The user's FXLLM_CACHE_DIR is what cache_root() gives after another root; the user's
    TORCHINDUCTOR_CACHE_DIR is never overwritten; a value the user sets later is theirs again."""
    user, x, inductor = tmp_path / "user", tmp_path / "x", str(tmp_path / "my-inductor")
    clean_env.setenv("FXLLM_CACHE_DIR", str(user))
    clean_env.setenv("TORCHINDUCTOR_CACHE_DIR", inductor)
    for root in (x, cache_root(), tmp_path / "y"):
        use_cache_root(root)
        assert current_root() == root and cache_root() == user
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == inductor
        assert os.environ["TRITON_CACHE_DIR"] == str(root / "triton")
    later = tmp_path / "later"
    os.environ["FXLLM_CACHE_DIR"] = str(later)  # the user changes it after fxllm set it
    assert cache_root() == later


def test_engine_without_cache_dir_after_one_with(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Engine A with compile.cache_dir=X, then engine B without: B's graph goes under the user's
    FXLLM_CACHE_DIR, not X, and Inductor's cache follows B."""
    from fxllm.backends.cpu import native

    native.available()  # loaded from the usual root first, so neither root builds the C++ kernels
    user, x = tmp_path / "user", tmp_path / "x"
    clean_env.setenv("FXLLM_CACHE_DIR", str(user))
    a = LLM(overrides=[*BASE, f"compile.cache_dir={x}"])
    assert len(GraphCache(x).entries()) == 1 and not GraphCache(user).entries()
    del a
    b = LLM(overrides=BASE)
    assert len(GraphCache(user).entries()) == 1 and len(GraphCache(x).entries()) == 1
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(user / "inductor")
    assert b.engine is not None
