"""FP8 KV cache: the cache dtype names, and the quantize/dequantize every attention path shares.

An FP8 cache stores float8_e4m3fn values `x / scale` clamped to +-448 (e4m3's largest finite value),
with one float32 scale per layer for keys and one for values: shape [1] (per tensor, as ModelOpt and
compressed-tensors checkpoints write `k_scale` / `v_scale`) or [num_kv_heads]. Reading multiplies
back. Scales are device tensors in the graph, never Python floats, so a CUDA graph replays with
whatever values they hold. Uncalibrated models use 1.0 (bf16 activations of most models are far
inside e4m3's range; vLLM and TensorRT-LLM do the same).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
CACHE_DTYPES: tuple[str, ...] = ("auto", "fp8")

# Where a loader puts a checkpoint's KV scales on the loaded Hugging Face model:
# `model.fxllm_kv_scales = {layer_index: (k_scale, v_scale)}`, floats or float32 tensors of shape [1]
# or [num_kv_heads]. Layer indices count attention layers from 0, as the cache's layers do.
KV_SCALES_ATTR = "fxllm_kv_scales"

KVScales = Mapping[int, tuple[float | Tensor, float | Tensor]]


def check_cache_dtype(name: str) -> None:
    """Fail unless `name` is a cache dtype fxllm knows (the config's value check for cache.dtype)."""
    if name not in CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}; use one of {', '.join(CACHE_DTYPES)}")


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's storage dtype for cache.dtype `name`: the model's dtype ("auto") or float8_e4m3fn."""
    check_cache_dtype(name)
    return FP8_KV_DTYPE if name == "fp8" else model_dtype


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether a cache of this dtype holds quantized values that need a scale."""
    return dtype == FP8_KV_DTYPE


def _per_head(scale: Tensor, x: Tensor) -> Tensor:
    """`scale` shaped to broadcast over x [..., Hkv, D]: one value, or one per KV head."""
    scale = scale.to(device=x.device, dtype=torch.float32)
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() != x.shape[-2]:
        raise ValueError(
            f"a KV scale has {scale.numel()} values; it must have 1 or one per KV head ({x.shape[-2]})"
        )
    return scale.reshape(-1, 1)


def quantize_kv(x: Tensor, scale: Tensor, dtype: torch.dtype = FP8_KV_DTYPE) -> Tensor:
    """x [..., Hkv, D] -> dtype values of x / scale, clamped to the format's range (saturating, no inf)."""
    return (x.float() / _per_head(scale, x)).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantize_kv(x: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Cache values [..., Hkv, D] -> `dtype`: times scale for FP8 caches, a plain cast for the others."""
    if not is_fp8(x.dtype):
        return x.to(dtype)
    if scale is None:
        raise ValueError("an FP8 KV cache is read without its scale: pass k_scale / v_scale")
    return (x.float() * _per_head(scale, x)).to(dtype)


def scale_tensor(value: float | Tensor) -> Tensor:
    """A checkpoint's scale (float or tensor) as the float32 CPU tensor the graph keeps ([1] or [Hkv])."""
    tensor = torch.as_tensor(value, dtype=torch.float32).detach().reshape(-1).cpu().clone()
    if tensor.numel() == 0 or not bool(torch.isfinite(tensor).all()) or bool((tensor <= 0).any()):
        raise ValueError(f"a KV cache scale must be finite and positive, got {tensor.tolist()}")
    return tensor
