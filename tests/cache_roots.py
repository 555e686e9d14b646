"""Compile-cache roots for tests of fxllm's own cache: its graphs start cold, the compiled code does not."""

from __future__ import annotations

import os
from pathlib import Path

# Inductor's and Triton's caches under the usual root, as `use_cache_root` names them.
COMPILED_CODE = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def usual_compiled_code_dirs() -> dict[str, str]:
    """TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR where every test without a root of its own compiles (the
    user's setting, else under the usual root): set them for a test whose compile-cache root is fresh, so
    that its post-pass graphs and standalone artifacts start cold while Inductor does not compile and g++
    build the same kernels again per test (~25 s for tiny-llama at load 1). Inductor's own cache is torch's
    to test; a cold Inductor compile still runs once per graph in the session."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from fxllm.backends.cpu import native

    root = native.cache_root()
    # `import torch` writes Inductor's default into the environment: not a user's choice (use_cache_root).
    defaults = {"TORCHINDUCTOR_CACHE_DIR": os.path.abspath(default_cache_dir())}
    dirs = {}
    for name, sub in COMPILED_CODE.items():
        user = os.environ.get(name)
        dirs[name] = user if user and user != defaults.get(name) else os.path.abspath(root / sub)
    return dirs


def fresh_cache_root(folder: Path) -> Path:
    """`folder` as an empty compile-cache root (no graphs, no artifacts) whose C++ CPU kernels and Inductor
    and Triton caches are the usual root's: its torch_extensions, inductor and triton link there. A rank
    spawned with `compile.cache_dir` pointing here loads the library (built once per machine and kernel
    source) instead of building it anew into every fresh root, ~25 s of g++ at load 1 per test (the kernels'
    build has tests of its own, test_cpu_kernels), and Inductor's kernels as `usual_compiled_code_dirs`
    says."""
    from fxllm.backends.cpu import native

    folder.mkdir(parents=True, exist_ok=True)
    links = {"torch_extensions": native.cache_root() / "torch_extensions"}
    links.update({sub: Path(usual_compiled_code_dirs()[name]) for name, sub in COMPILED_CODE.items()})
    for name, usual in links.items():
        usual.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(usual, target_is_directory=True)
    return folder
