"""Fixtures shared by several test files."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from model_fixtures import first_layers

from fxllm.models import LoadedModel, load_model

# Under pytest-xdist (`-n 2`) the workers share the cores: each gets its share of threads, and so do the
# servers and ranks it spawns (OpenMP threads spinning on a core another worker holds cost seconds a step).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)

# Where a build's compile.cache_dir points the process's caches (fxllm.compiler.cache.use_cache_root sets these):
# put back after every test and every module, so that one test's temporary root does not become every later
# test's (their graphs cold again, and fxllm's C++ kernels built again by each rank spawned after it).
CACHE_ENV = ("FXLLM_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def _restore_cache_env() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in CACHE_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


restore_cache_env = pytest.fixture(autouse=True)(_restore_cache_env)
restore_cache_env_per_module = pytest.fixture(scope="module", autouse=True)(_restore_cache_env)

# SmolLM2's first layers: every kind of node in the graph, a seventh of the capture and compile time.
SMOLLM2_SHORT_LAYERS = 4


@pytest.fixture
def native_op() -> Callable[[str], torch._ops.OpOverload]:
    """`native_op(name)`: the C++ CPU op `torch.ops.fxllm_cpu.<name>.default`; skips the test where the
    library (fxllm/backends/cpu/csrc) did not build."""

    def get(name: str) -> torch._ops.OpOverload:
        from fxllm.backends.cpu import native

        op = native.op(name)
        if op is None:
            pytest.skip("the C++ CPU kernels did not build (see the log for the compiler's message)")
        return op

    return get


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The embedded SmolLM2, de-quantized from its GGUF once per session (~6 s per load) and shared: read it
    (HF generate, its tokenizer) but hand an LLM a `copy.deepcopy` of the model, never the model itself."""
    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_short(smollm2: LoadedModel) -> LoadedModel:
    """SmolLM2 cut to its first SMOLLM2_SHORT_LAYERS layers (real weights, vocabulary and tokenizer), shared
    per session like `smollm2`: deepcopy the model before building an LLM on it."""
    return first_layers(smollm2, SMOLLM2_SHORT_LAYERS)
