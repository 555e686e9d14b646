"""Fresh compile-cache roots for tests whose spawned ranks would otherwise build fxllm's C++ CPU kernels again."""

from __future__ import annotations

from pathlib import Path


def fresh_cache_root(folder: Path) -> Path:
    """`folder` as an empty compile-cache root (graphs, Inductor's and Triton's caches start cold) whose C++ CPU
    kernels are the usual root's: its torch_extensions links there. A rank spawned with `compile.cache_dir`
    pointing here loads the library (built once per machine and kernel source) instead of building it anew
    into every fresh root, ~25 s of g++ at load 1 per test; the kernels' build has tests of its own
    (test_cpu_kernels)."""
    from fxllm.backends.cpu import native

    usual = native.cache_root() / "torch_extensions"
    usual.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "torch_extensions").symlink_to(usual, target_is_directory=True)
    return folder
