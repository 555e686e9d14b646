"""Triton gated activations: drop-in CUDA implementations of `fxllm::silu_and_mul` / `gelu_and_mul`.

gate and up are usually the two halves of one merged [.., 2I] GEMM output: slices with unit last
stride and row stride 2I. The kernel takes each operand's row stride, so no copy is made; the
leading dims are collapsed into rows by a view (a copy only if they are not collapsible).
Grid (rows, cdiv(I, BLOCK)); math in float32, one rounding to the output dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from fxllm.backends.triton.norms import _as_rows

_BLOCK = 1024


@triton.jit
def gated_activation(g, ACT: tl.constexpr):
    """act(g) in float32: 0 silu, 1 exact (erf) gelu, 2 tanh gelu (shared with quant_fused.py's FP8 kernels)."""
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        # 0.5 * (1 + tanh(y)) == sigmoid(2y): exact identity, and needs no tanh intrinsic.
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g / (1.0 + tl.exp(-2.0 * y))
    return a


@triton.jit
def _gated_kernel(
    g_ptr,
    u_ptr,
    o_ptr,
    n_cols,
    stride_g,
    stride_u,
    stride_o,
    ACT: tl.constexpr,  # 0 silu, 1 exact (erf) gelu, 2 tanh gelu
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    a = gated_activation(g, ACT)
    tl.store(o_ptr + row * stride_o + cols, (a * u).to(o_ptr.dtype.element_ty), mask=mask)


_ACTS = {"silu": 0, "none": 1, "tanh": 2}


def gated_activation_out(gate: Tensor, up: Tensor, out: Tensor, act: str) -> None:
    """Write act(gate) * up into `out`; act is "silu", "none" (erf gelu) or "tanh" (tanh gelu)."""
    n_cols = gate.shape[-1]
    g2, u2 = _as_rows(gate), _as_rows(up)
    o2 = out.view(-1, n_cols)
    if g2.shape[0] == 0 or n_cols == 0:
        return
    block = min(_BLOCK, triton.next_power_of_2(n_cols))
    grid = (g2.shape[0], triton.cdiv(n_cols, block))
    _gated_kernel[grid](
        g2, u2, o2, n_cols, g2.stride(0), u2.stride(0), o2.stride(0),
        ACT=_ACTS[act], BLOCK=block, num_warps=4,
    )  # fmt: skip


def _new_out(gate: Tensor, up: Tensor) -> Tensor:
    return torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)


def silu_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    """Triton silu(gate) * up."""
    if gate.shape != up.shape or gate.dim() == 0:
        return (F.silu(gate) * up).contiguous()
    out = _new_out(gate, up)
    gated_activation_out(gate, up, out, "silu")
    return out


def gelu_and_mul(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """Triton gelu(gate, approximate) * up."""
    if gate.shape != up.shape or gate.dim() == 0 or approximate not in ("none", "tanh"):
        return (F.gelu(gate, approximate=approximate) * up).contiguous()
    out = _new_out(gate, up)
    gated_activation_out(gate, up, out, approximate)
    return out
