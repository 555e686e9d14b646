"""What fxllm's CPU kernels need to know about this processor, and the dtype codes their C++ takes."""

from __future__ import annotations

import torch

# The kernels' `dtype` argument: 0 = float32, 1 = bfloat16 (stored as uint16).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def has_avx512() -> bool:
    """Whether PyTorch runs this CPU at its AVX-512 level (the kernels' fast paths need it)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def has_avx512_bf16() -> bool:
    """AVX-512 with the bfloat16 dot product (VDPBF16PS)."""
    return has_avx512() and torch.cpu._is_avx512_bf16_supported()
