"""match_rms_norm: RMSNorm in its Llama form and its Gemma (1 + weight) form -> fxllm::rms_norm."""

from __future__ import annotations

import torch
from torch import Tensor

import fxllm.ops  # noqa: F401  (registers torch.ops.fxllm)
from fxllm.passes.pattern import PatternPass, Rewrite

_EPS = 1.234567e-5  # a value no model uses, so the traced pattern can find and free it


def _llama_search(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _llama_replace(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.ops.fxllm.rms_norm(x, weight, eps)


def _gemma_search(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


def _gemma_replace(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Gemma multiplies in float32 before the cast; the op casts first. In float32 the two are the
    # same; in bf16 they differ by one rounding of the product (covered by the bf16 tolerance).
    return torch.ops.fxllm.rms_norm(x, (1.0 + weight.float()).to(x.dtype), eps)


_ANCHORS = (torch.ops.aten.rsqrt, torch.ops.aten.mean)


def _inputs(dtype: torch.dtype) -> list[object]:
    return [torch.randn(2, 3, 16, dtype=dtype), torch.randn(16, dtype=dtype), _EPS]


match_rms_norm = PatternPass(
    "match_rms_norm",
    "match",
    [
        Rewrite(_llama_search, _llama_replace, _inputs, scalars={"eps": _EPS}, anchors=_ANCHORS),
        Rewrite(_gemma_search, _gemma_replace, _inputs, scalars={"eps": _EPS}, anchors=_ANCHORS),
    ],
    description="RMSNorm (Llama and Gemma forms) -> fxllm::rms_norm",
    builtin=True,
)
