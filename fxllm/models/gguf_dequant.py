"""De-quantize GGUF tensor data with whole-tensor torch ops (the GGUF cache's warm load).

gguf-py de-quantizes 16 rows at a time over numpy memmap slices: for SmolLM2's 211 quantized tensors that is
~230k memmap slices and ~2.5-8 s on the 2-core box. The common block formats are a few vectorized numpy
ops over the whole tensor here, computing exactly what gguf-py computes (the same float32 multiply, then
add, element by element), so the values are bit-equal; the GGUF cache checks that against transformers'
load before it keeps an entry. Other formats go through gguf-py on a plain (non-memmap) copy.
"""

from __future__ import annotations

import numpy as np
import torch

# ggml type -> (block size in values, block size in bytes); gguf's GGMLQuantizationType numbering.
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
_BLOCKS = {Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # Byte j of a block holds value j in its low nibble and value j + 16 in its high one.
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def dequantize(data: np.ndarray, ggml_type: int) -> torch.Tensor:
    """float32 values of one tensor's data (`data`: its bytes as gguf-py shapes them, rows x bytes per row)."""
    # numpy, not torch: single-threaded, so these small element-wise ops do not wait on a busy box's
    # intra-op thread pool (10x slower with 2 threads at load 6, measured).
    if ggml_type == F32:
        return torch.from_numpy(np.array(data.view(np.float32)))
    if ggml_type == F16:
        return torch.from_numpy(data.view(np.float16).astype(np.float32))
    if ggml_type not in _BLOCKS:
        from gguf import GGMLQuantizationType
        from gguf import dequantize as gguf_dequantize

        # A plain copy first: slicing a memmap runs Python code per slice, and gguf-py slices a lot.
        out = gguf_dequantize(np.array(data), GGMLQuantizationType(ggml_type))
        return torch.from_numpy(np.ascontiguousarray(out))
    values, nbytes = _BLOCKS[ggml_type]
    rows = data.shape[:-1]
    blocks = np.array(data, dtype=np.uint8).reshape(-1, nbytes)
    # In place: each op writes the one float32 buffer (x * d is d * x bit for bit; the minimum is added after).
    if ggml_type == Q8_0:
        out = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)
        out *= _half(blocks, 0)
    elif ggml_type == Q4_0:
        out = (_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)
        out *= _half(blocks, 0)
    else:  # Q4_1: scale, then minimum
        out = _nibbles(blocks[:, 4:]).astype(np.float32)
        out *= _half(blocks, 0)
        out += _half(blocks, 2)
    return torch.from_numpy(out.reshape(*rows, data.shape[-1] // nbytes * values))
