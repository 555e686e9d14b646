"""match_gated_mlp: silu(gate) * up -> fxllm::silu_and_mul, gelu(gate) * up -> fxllm::gelu_and_mul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fxllm.ops  # noqa: F401  (registers torch.ops.fxllm)
from fxllm.passes.pattern import PatternPass, Rewrite


def _inputs(dtype: torch.dtype) -> list[object]:
    return [torch.randn(2, 3, 16, dtype=dtype), torch.randn(2, 3, 16, dtype=dtype)]


def _silu_gate_first(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def _silu_up_first(gate: Tensor, up: Tensor) -> Tensor:
    return up * F.silu(gate)  # Phi-3 writes the product this way round


def _silu_replace(gate: Tensor, up: Tensor) -> Tensor:
    return torch.ops.fxllm.silu_and_mul(gate, up)


def _gelu_rewrites(approximate: str) -> list[Rewrite]:
    def gate_first(gate: Tensor, up: Tensor) -> Tensor:
        return F.gelu(gate, approximate=approximate) * up

    def up_first(gate: Tensor, up: Tensor) -> Tensor:
        return up * F.gelu(gate, approximate=approximate)

    def replace(gate: Tensor, up: Tensor) -> Tensor:
        return torch.ops.fxllm.gelu_and_mul(gate, up, approximate)

    anchors = (torch.ops.aten.gelu,)
    return [
        Rewrite(gate_first, replace, _inputs, anchors=anchors),
        Rewrite(up_first, replace, _inputs, anchors=anchors),
    ]


match_gated_mlp = PatternPass(
    "match_gated_mlp",
    "match",
    [
        Rewrite(_silu_gate_first, _silu_replace, _inputs, anchors=(torch.ops.aten.silu,)),
        Rewrite(_silu_up_first, _silu_replace, _inputs, anchors=(torch.ops.aten.silu,)),
        *_gelu_rewrites("tanh"),
        *_gelu_rewrites("none"),
    ],
    description="SwiGLU / GeGLU -> fxllm::silu_and_mul / fxllm::gelu_and_mul",
    builtin=True,
)
