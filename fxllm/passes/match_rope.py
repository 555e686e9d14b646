"""match_rope: rotate-half rotary embedding on q and k -> one fxllm::rotary_embedding."""

from __future__ import annotations

import torch
from torch import Tensor

import fxllm.ops  # noqa: F401  (registers torch.ops.fxllm)
from fxllm.passes.pattern import PatternPass, Rewrite


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _search(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _replace(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    out = torch.ops.fxllm.rotary_embedding(q, k, cos, sin)
    return out[0], out[1]


def _inputs(dtype: torch.dtype) -> list[object]:
    # [B, H, T, D] against cos/sin [B, 1, T, D], as Hugging Face lays them out.
    return [
        torch.randn(2, 4, 3, 16, dtype=dtype),
        torch.randn(2, 2, 3, 16, dtype=dtype),
        torch.randn(2, 1, 3, 16, dtype=dtype),
        torch.randn(2, 1, 3, 16, dtype=dtype),
    ]


def _splits_in_half(match: object) -> bool:
    # Integers in patterns match any value; make sure the slices really split the last dim in half.
    for node in match.nodes:  # type: ignore[attr-defined]
        if node.target == torch.ops.aten.slice.Tensor:
            size = node.args[0].meta["val"].shape[-1]
            start = node.args[2] if len(node.args) > 2 else 0
            if start not in (0, size // 2):
                return False
    return True


match_rope = PatternPass(
    "match_rope",
    "match",
    [
        Rewrite(
            _search,
            _replace,
            _inputs,
            extra_check=_splits_in_half,
            anchors=(torch.ops.aten.cat, torch.ops.aten.neg),
        )
    ],
    description="rotate-half RoPE on q and k -> fxllm::rotary_embedding",
    builtin=True,
)
