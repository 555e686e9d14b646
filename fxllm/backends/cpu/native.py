"""Native (C++) dispatcher kernels for fxllm's CPU ops: build once, install per op, uninstall.

The "cpu" backend of paged_attention and packed_linear installs these instead of its Python
functions where they build (bind_op_backends calls `install`), so Inductor's generated code calls
straight into C++. The library compiles through Inductor's C++ code cache with the PyTorch headers
(about 10 s once; later processes load it from the on-disk cache).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import torch

from fxllm.backends.cpu.native_cpp import native_source
from fxllm.ops.linear import packed_linear_reference
from fxllm.ops.paged_attention import paged_attention_reference

logger = logging.getLogger(__name__)

NATIVE_OPS = ("packed_linear", "paged_attention")

# The references, as ops of their own, for what the C++ kernels do not take (float16, float64,
# non-contiguous caches): the C++ wrapper calls them through the dispatcher.
_FALLBACK_LIB = torch.library.Library("fxllm_cpu_fallback", "DEF")


def _define_fallbacks() -> None:
    for op, fn in (
        ("packed_linear", packed_linear_reference),
        ("paged_attention", paged_attention_reference),
    ):
        schema = str(getattr(torch.ops.fxllm, op).default._schema).removeprefix("fxllm::")
        _FALLBACK_LIB.define(schema)
        _FALLBACK_LIB.impl(op, _contiguous_result(fn), "CompositeExplicitAutograd")


def _contiguous_result(fn: Any) -> Any:
    return lambda *args: fn(*args).contiguous()


_define_fallbacks()


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Compile (or load from Inductor's cache) the native kernels; None if that fails."""
    try:
        from torch._inductor.codecache import CppCodeCache

        class _TorchCppCodeCache(CppCodeCache):
            cache: dict[str, Any] = {}
            cpp_compile_command_flags = {"include_pytorch": True, "shared": True}

        avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
        bf16 = avx512 and torch.cpu._is_avx512_bf16_supported()
        logger.info("loading fxllm's native CPU kernels (the first build takes ~10 s)")
        lib = _TorchCppCodeCache.load(native_source(avx512=avx512, avx512_bf16=bf16))
        lib.fxllm_native_install.restype = ctypes.c_int64
        lib.fxllm_native_configure(ctypes.c_int64(avx512), ctypes.c_int64(bf16))
        return lib
    except Exception:  # a build failure must not break a run: the Python kernels stay in place
        logger.warning(
            "fxllm's native CPU kernels failed to build; using the Python-bound ones", exc_info=True
        )
        return None


def install(op: str) -> bool:
    """Make the C++ kernel `op`'s CPU kernel; False when the library did not build."""
    if op not in NATIVE_OPS:
        raise ValueError(f"no native CPU kernel for {op!r}; native ops: {NATIVE_OPS}")
    lib = _library()
    return lib is not None and bool(lib.fxllm_native_install(op.encode()))


def uninstall(op: str) -> None:
    """Remove `op`'s C++ kernel if installed (the dispatcher falls back to what it had before)."""
    lib = _library.cache_info().currsize and _library()
    if lib:
        lib.fxllm_native_uninstall(op.encode())
