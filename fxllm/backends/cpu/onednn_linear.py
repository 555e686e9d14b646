"""`fxllm_cpu::onednn_linear`: the CPU implementation of `fxllm::linear` over a oneDNN-packed copy of its weight.

Inductor's weight freezing made the same oneDNN call (`mkldnn._linear_pointwise` on a weight reordered
by `mkldnn._reorder_linear_weight`, what freezing emits for a graph with a symbolic token count), but a
frozen graph is never cached by Inductor or AOTAutograd, so every start compiled it for minutes. Here
the graph keeps the plain weight, like any weight (the compile cache binds it from the loaded model,
Inductor's caches and fxllm's standalone artifact work as for any graph), and the op packs it on its
first call (the engine's warm-up, on a warm start too), keeping the packed copy beside the weight for as
long as the weight lives (csrc/onednn_linear.cpp). The op is opaque to Inductor: an extern call, as the
frozen graph's was. Memory: the packed copy is held as well as the plain weight, as with freezing.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from fxllm.backends.registry import OpSite

logger = logging.getLogger(__name__)

BACKEND = "onednn"
PRIORITY = 5
# The row count oneDNN picks the packed layout for (set in the C++ op when the library loads). Decode steps
# have one row per sequence; what freezing used was the size hint of the token symbol. Per-call speed barely
# moved between 1, 16 and 128 on SmolLM2's shapes (2-core AVX2 box, 2026-11-28), so one layout serves every step.
BATCH_HINT = 16


@functools.cache
def packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` weights on this CPU (bfloat16 needs AVX-512 or AVX-NE-CONVERT)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError as error:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
        logger.info("oneDNN does not pack %s linear weights here (%s): those linears stay aten.linear", dtype,
                    str(error).splitlines()[0])  # fmt: skip
        return False
    return True


def supports(site: OpSite) -> bool:
    """CPU linears whose input, 2-D weight and bias share a dtype oneDNN packs here."""
    if site.device.type != "cpu" or len(site.args) < 2:
        return False
    x, weight = site.args[0], site.args[1]
    bias = site.args[2] if len(site.args) > 2 else None
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)) or weight.dim() != 2:
        return False
    if x.dtype != weight.dtype or (isinstance(bias, Tensor) and bias.dtype != weight.dtype):
        return False
    return packable(weight.dtype)


def num_packed() -> int:
    """Weights the op has packed that are alive in this process (0 where the C++ library did not build)."""
    from fxllm.backends.cpu import native

    return int(torch.ops.fxllm_cpu.onednn_linear_num_packed()) if native.available() else 0
