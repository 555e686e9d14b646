"""Where `fxllm_cpu::packed_linear` has a kernel (csrc/linear.cpp): the pack_linears pass asks before it
rewrites a linear, since the op's reference (unpack, then F.linear) is slower than the plain linear."""

from __future__ import annotations

import torch

from fxllm.backends.cpu import native
from fxllm.backends.cpu.isa import DTYPE_CODES, has_avx512, has_avx512_bf16


def available(dtype: torch.dtype) -> bool:
    """Whether this CPU runs the kernel for `dtype` (AVX-512; bfloat16 also needs AVX512-BF16) and it built."""
    if dtype not in DTYPE_CODES or not has_avx512():
        return False
    if dtype == torch.bfloat16 and not has_avx512_bf16():
        return False
    return native.available()
