"""fxllm's C++ CPU kernels (csrc/) as the ops `fxllm_cpu::packed_linear`, `fxllm_cpu::paged_attention`,
`fxllm_cpu::onednn_linear` and `fxllm_cpu::argmax_rows`.

The library builds on first use with `torch.utils.cpp_extension.load` (ninja; ~1 min on the shared 2-core box)
into a directory keyed by the sources, flags, torch version and CPU, under `$FXLLM_CACHE_DIR` (default
`~/.cache/fxllm`); later processes load it from there in well under a second. Nothing is installed on the
canonical `fxllm::` ops: the lowering pass rewrites graph nodes to `op(name)`. A build failure is logged
once and `available()` is then False, so callers fall back to the references. A cold CPU start builds it in a
background thread (`start_background_build`, only when the library is not built yet) while the model loads
and is captured; `available()` joins that thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fxllm.ops  # noqa: F401  (the C++ ops hand what they cannot take to the canonical fxllm:: ops)
from fxllm.backends.cpu.isa import DTYPE_CODES, has_avx512, has_avx512_bf16

logger = logging.getLogger(__name__)

NATIVE_OPS = ("packed_linear", "paged_attention", "onednn_linear", "argmax_rows")

CSRC = Path(__file__).parent / "csrc"
# ops.cpp first: with the PyTorch headers it takes longest, and ninja starts jobs in this order.
_SOURCES = ("ops.cpp", "attention.cpp", "linear.cpp", "argmax.cpp", "write_kv.cpp", "onednn_linear.cpp")
_NAME = "fxllm_cpu_kernels"
# The flags that matter from the Inductor C++ code cache build this replaced: -O3, -march=native (the
# AVX-512 intrinsics sit behind target attributes, but the plain loops vectorise for this CPU),
# -ffp-contract=off (no FMA contraction in the plain loops, as before) and OpenMP. Inductor's -fmath-errno
# and -fno-tree-loop-vectorize were switched back off by a pragma in the kernel sources; here they are
# simply not passed.
_CFLAGS = ("-O3", "-DNDEBUG", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp")
_LDFLAGS = ("-fopenmp",)

_load_lock = threading.Lock()
_loaded: bool | None = None  # None until the first available()
_background: BackgroundBuild | None = None  # the cold start's build thread, until available() joins it


class NativeBuildError(RuntimeError):
    """The C++ CPU kernels did not build or load; the message holds the compiler's output."""


def cache_root() -> Path:
    """fxllm's on-disk cache: `$FXLLM_CACHE_DIR`, else `~/.cache/fxllm`."""
    return Path(os.environ.get("FXLLM_CACHE_DIR", Path.home() / ".cache" / "fxllm"))


def _cpu_id() -> str:
    """What -march=native compiles for: a build is only reused on the same kind of CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags")
    return "\n".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in wanted))


def build_directory() -> Path:
    """Where the library is built: one directory per (sources, flags, torch, Python, CPU)."""
    key = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            key.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    parts = (
        *_SOURCES,
        *_CFLAGS,
        *_LDFLAGS,
        torch.__version__,
        sys.version,
        os.environ.get("CXX", ""),
        _cpu_id(),
    )
    for part in parts:
        key.update(part.encode() + b"\0")
    return cache_root() / "torch_extensions" / key.hexdigest()[:16]


def _canonical_fake(name: str) -> Callable[..., torch.Tensor]:
    canonical = getattr(torch.ops.fxllm, name).default

    def fake(*args: object, **kwargs: object) -> torch.Tensor:
        # Under the fake mode the canonical op runs its own fake: same shapes, dtypes and strides.
        return canonical(*args, **kwargs)

    return fake


def _argmax_rows_fake(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)


def _load(jobs: int | None = None) -> None:
    """Build (or load from the cache) the library, set its ISA and register its fakes; raises on failure.
    `jobs`: how many compilers run at once (the user's MAX_JOBS wins; None: ninja's default, cores + 2)."""
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not (directory / f"{_NAME}.so").exists():
        logger.info(
            "building fxllm's C++ CPU kernels into %s (once per machine and kernel source%s)",
            directory,
            f"; {jobs} compiler(s) at a time, in the background" if jobs else "",
        )
    # cpp_extension reads the job count from MAX_JOBS only; nothing else in the process builds meanwhile.
    set_jobs = jobs is not None and "MAX_JOBS" not in os.environ
    if set_jobs:
        os.environ["MAX_JOBS"] = str(jobs)
    try:
        load(
            name=_NAME,
            sources=[str(CSRC / source) for source in _SOURCES],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(directory),
            is_python_module=False,
        )
    finally:
        if set_jobs:
            os.environ.pop("MAX_JOBS", None)
    logger.info("fxllm's C++ CPU kernels ready in %.1f s (%s)", time.perf_counter() - start, directory)
    torch.ops.fxllm_cpu.set_isa(has_avx512(), has_avx512_bf16())
    for name in ("packed_linear", "paged_attention"):
        torch.library.register_fake(f"fxllm_cpu::{name}", _canonical_fake(name))
    torch.library.register_fake("fxllm_cpu::onednn_linear", _canonical_fake("linear"))
    from fxllm.backends.cpu.onednn_linear import BATCH_HINT

    torch.ops.fxllm_cpu.onednn_linear_set_batch_hint(BATCH_HINT)
    torch.library.register_fake("fxllm_cpu::argmax_rows", _argmax_rows_fake)


def is_built() -> bool:
    """Whether the library for this source, flags, torch and CPU is on disk (a file check, no build tools)."""
    return (build_directory() / f"{_NAME}.so").exists()


# One compiler at a time in the background: the start's own work (GGUF load, capture) is one Python thread,
# so on 2 cores the build takes the other core instead of ninja's 4 jobs slowing the load down (cold start on
# an idle box, last session: load 12.6 -> 21.6 s, capture 16.6 -> 18.9 s with ninja's default).
BACKGROUND_JOBS = 1


class BackgroundBuild:
    """The library's build in a thread: a cold start compiles it while the model loads and is captured."""

    def __init__(self, jobs: int | None = BACKGROUND_JOBS) -> None:
        self.error: BaseException | None = None
        self.jobs = jobs
        self.thread = threading.Thread(target=self._run, name="fxllm-cpu-kernels-build", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            _load(self.jobs)
        except BaseException as error:  # kept for join(): the thread has no caller to raise to
            self.error = error

    def join(self) -> None:
        """Wait for the build; raises NativeBuildError with the build's message when it failed."""
        start = time.perf_counter()
        self.thread.join()
        waited = time.perf_counter() - start
        if waited > 0.1:
            logger.info("waited %.1f s for the background build of fxllm's C++ CPU kernels", waited)
        if self.error is not None:
            raise NativeBuildError(f"{type(self.error).__name__}: {self.error}") from self.error


def start_background_build() -> BackgroundBuild | None:
    """Build the library in a thread when it is not built yet (None when it is built, loaded, or building):
    on a warm start this is one file check, with no cpp_extension import competing with the start."""
    global _background
    with _load_lock:
        if _loaded is not None or _background is not None or is_built():
            return None
        _background = BackgroundBuild()
        return _background


def _join_background() -> None:
    """Join the background build, if one was started; raises NativeBuildError when it failed."""
    global _background
    build = _background
    if build is not None:
        _background = None
        build.join()


def available() -> bool:
    """Whether the library builds (or loads from the cache) here; the first call may build it (or wait for
    the background build)."""
    global _loaded
    if _loaded is None:
        with _load_lock:  # one build and one fake registration, whichever thread asks first
            if _loaded is None:
                try:
                    if _background is not None:
                        _join_background()
                    else:
                        _load()
                    _loaded = True
                except Exception as error:  # a build failure must not break a run: the references still work
                    # The message holds the compiler's output; the traceback adds nothing but length.
                    logger.warning(
                        "fxllm's C++ CPU kernels failed to build or load; the ops' references run instead. "
                        "Check that g++ and ninja are installed (pip install ninja). %s: %s",
                        type(error).__name__,
                        error,
                    )
                    logger.debug("C++ CPU kernel build failure", exc_info=True)
                    _loaded = False
    return _loaded


def op(name: str) -> torch._ops.OpOverload | None:
    """`torch.ops.fxllm_cpu.<name>.default` once the library is loaded; None where it does not build."""
    if name not in NATIVE_OPS:
        raise ValueError(f"no C++ CPU op {name!r}; the C++ CPU ops are {NATIVE_OPS}")
    if not available():
        return None
    return getattr(torch.ops.fxllm_cpu, name).default


def argmax_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """`logits.argmax(dim=-1)` for 2-D float32 or bfloat16 CPU logits with contiguous rows (first index of
    the maximum, NaN counting as the maximum); None where the kernel cannot, so the caller uses torch."""
    if (
        logits.dtype not in DTYPE_CODES
        or logits.dim() != 2
        or logits.device.type != "cpu"
        or logits.stride(1) != 1
    ):
        return None
    if not available():
        return None
    return torch.ops.fxllm_cpu.argmax_rows.default(logits)
