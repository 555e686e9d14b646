"""FP8 (e4m3fn) quantization: the exact arithmetic every FP8 GEMM path must reproduce.

A value v with scale s is stored as e4m3(clamp(v / s, -448, 448)) and read back as float32(q) * s.
Scales are float32 and are never below MIN_SCALE, so an all-zero row quantizes to zeros, not NaN.
Weights: `channel` ([N, 1], amax of each output row / 448), `tensor` ([1]) or `block` ([ceil(N/128),
ceil(K/128)], one scale per 128 x 128 tile, as DeepSeek-V3 / compressed-tensors `block`). Activations:
per token ([M, 1], amax of the row / 448, computed at run time), per tensor at run time ([1, 1], amax of
the whole input / 448: `quantize_activation_tensor`) or one static scale ([1]).
Only torch calls on tensors are made here (no Python scalars built from tensor values), so the compile
cache's recorder can replay the weight quantization on a warm start.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor: keeps 0 / 0 out of all-zero rows
BLOCK = 128  # block granularity's tile edge
GRANULARITIES = ("channel", "tensor", "block")


def _cast(x: Tensor, scale: Tensor) -> Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def expand_block_scale(scale: Tensor, n: int, k: int) -> Tensor:
    """A [ceil(N/128), ceil(K/128)] block scale -> one value per weight element, [N, K]."""
    return scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]


def quantize_weight(weight: Tensor, granularity: str = "channel") -> tuple[Tensor, Tensor]:
    """An [N, K] float weight -> (e4m3 weight [N, K], float32 scale) of the given granularity."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if granularity == "channel":
        scale = w.abs().amax(dim=1, keepdim=True).div(FP8_MAX).clamp(min=MIN_SCALE)
        return _cast(w, scale), scale
    if granularity == "tensor":
        scale = w.abs().amax().reshape(1).div(FP8_MAX).clamp(min=MIN_SCALE)
        return _cast(w, scale), scale
    if granularity == "block":
        n, k = w.shape
        rows, cols = -(-n // BLOCK), -(-k // BLOCK)
        padded = torch.nn.functional.pad(w.abs(), (0, cols * BLOCK - k, 0, rows * BLOCK - n))
        scale = padded.view(rows, BLOCK, cols, BLOCK).amax(dim=(1, 3)).div(FP8_MAX).clamp(min=MIN_SCALE)
        return _cast(w, expand_block_scale(scale, n, k)), scale
    raise ValueError(f"unknown FP8 weight granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")


def weight_granularity(weight: Tensor, scale: Tensor) -> str:
    """Which granularity an (e4m3 weight, scale) pair has, from the scale's shape; fails on others."""
    n, k = weight.shape
    if scale.numel() == 1:
        return "tensor"
    if tuple(scale.shape) in ((n, 1), (n,)):
        return "channel"
    if tuple(scale.shape) == (-(-n // BLOCK), -(-k // BLOCK)):
        return "block"
    raise ValueError(
        f"FP8 weight scale of shape {tuple(scale.shape)} fits no granularity of a {n} x {k} weight: expected "
        f"[1] (tensor), [{n}, 1] (channel) or [{-(-n // BLOCK)}, {-(-k // BLOCK)}] (128 x 128 blocks)"
    )


def dequantize_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """(e4m3 weight [N, K], scale) -> the float32 weight it stands for."""
    kind = weight_granularity(weight, scale)
    if kind == "block":
        return weight.float() * expand_block_scale(scale.float(), *weight.shape)
    return weight.float() * scale.float().reshape(-1, 1)


def quantize_activation(x: Tensor, input_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """[M, K] activations -> (e4m3 [M, K], float32 scale): per token ([M, 1]) unless a static scale is given."""
    if input_scale is None:
        scale = x.detach().abs().amax(dim=-1, keepdim=True).float().div(FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = input_scale.float().reshape(1, 1)
    return _cast(x, scale), scale


def quantize_activation_tensor(x: Tensor) -> tuple[Tensor, Tensor]:
    """[M, K] activations -> (e4m3 [M, K], float32 scale [1, 1]): one scale, amax of the whole input / 448."""
    scale = x.detach().abs().amax().float().div(FP8_MAX).clamp(min=MIN_SCALE).reshape(1, 1)
    return _cast(x, scale), scale
