"""CPU kernel of `fxllm::packed_linear`: the C++ GEMM in linear_cpp.py over the packed weight.

Measured on the 2-core dev box (Zen 5, SmolLM2 shapes, every layer's weights distinct so they
stream from DRAM): bfloat16 at 1 token per step, 6.6 ms for all 121 projections (oneDNN with
pre-packed weights: 7.0 ms without the LM head); 16 tokens 10.2 ms (oneDNN ~11.4 ms); a
2048-token prefill layer 17.2 ms (oneDNN 16.3). float32 at 2048 tokens: 39.7 ms (MKL 70 ms).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fxllm.backends.cpu.isa import DTYPE_CODES, has_avx512, has_avx512_bf16
from fxllm.backends.cpu.linear_cpp import LINEAR_ARGS, LINEAR_SOURCE
from fxllm.ops.eager import eager_only
from fxllm.ops.linear import packed_linear_reference

logger = logging.getLogger(__name__)

_NO_BIAS = torch.zeros(1)


@functools.cache
def _kernel() -> Callable[..., Any] | None:
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        return CppPythonBindingsCodeCache.load_pybinding(LINEAR_ARGS, LINEAR_SOURCE)
    except Exception:  # a build failure must not break a run: the pass then leaves linears alone
        logger.warning("CPU packed-linear kernel failed to build", exc_info=True)
        return None


def available(dtype: torch.dtype) -> bool:
    """Whether this CPU can run the kernel for `dtype` (AVX-512; bfloat16 also needs AVX512-BF16)."""
    if dtype not in DTYPE_CODES or not has_avx512():
        return False
    if dtype == torch.bfloat16 and not has_avx512_bf16():
        return False
    return _kernel() is not None


@eager_only
def packed_linear(x: Tensor, packed_weight: Tensor, out_features: int, bias: Tensor | None = None) -> Tensor:
    """Same contract as the reference (fxllm/ops/linear.py)."""
    # Called ~120 times per decode step: the common case (contiguous x, no bias) does as little
    # Python as possible (~3 us of each call was Python before).
    kernel = _kernel()
    code = DTYPE_CODES.get(x.dtype)
    if kernel is None or code is None or packed_weight.dtype != x.dtype or not packed_weight.is_contiguous():
        return packed_linear_reference(x, packed_weight, out_features, bias).contiguous()
    in_features = x.shape[-1]
    if not x.is_contiguous():
        x = x.contiguous()
    out = x.new_empty((*x.shape[:-1], out_features))
    bias_values = _NO_BIAS if bias is None else bias.float().contiguous()
    kernel(
        code, x, x.numel() // in_features, in_features, in_features, packed_weight, out_features,
        bias_values, int(bias is not None), out, out_features, torch.get_num_threads(),
    )  # fmt: skip
    return out
