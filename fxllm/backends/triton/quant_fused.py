"""Triton kernels that write the FP8 activation directly: `fxllm::fused_add_rms_norm_fp8`,
`fxllm::rms_norm_fp8`, `fxllm::silu_and_mul_fp8` and `fxllm::gelu_and_mul_fp8` (fxllm/ops/fp8_fused.py has
the semantics).

Each is its unquantized kernel (norms.py, activations.py: the same operations in the same order, so the
normed / activated row is bit for bit what they store) followed, in registers, by quantize_activation:
round the row to its output dtype, amax(|row|) / 448 floored at MIN_SCALE, then row / scale clamped to
+-448 and cast to e4m3 (round to nearest even). Both divisions are IEEE (`div_rn`), as torch's eager
tensor division (torch on CUDA divides by a Python number as a multiplication by its reciprocal, so its
scale can be 1 ulp off these); Triton's plain `/` is div.full.f32 (approximate), which Inductor emits by default, so the
unfused Inductor-compiled quantization may put a value one e4m3 step away where the quotient sits
within ~2 ulp of a rounding boundary (rare; benchmarks/gpu_fp8.py's fused_quant section counts them).
The e4m3 row is written once: the bf16 activation the unfused path wrote and read back is never stored.

A gated activation (SiLU- or GeLU-and-mul) needs the row's amax before it can write any e4m3 value and its rows are long (Llama-3.1-8B:
14,336), so one program takes a row: up to ONE_PASS_MAX columns it holds the row in registers (one read);
wider, it walks the row twice in chunks: pass 1 the amax, pass 2 recomputes and writes (the second read of
gate/up mostly hits L2). The norm holds its row in registers (norms.py's tiling), so it reads once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxllm.backends.triton.activations import gated_activation
from fxllm.backends.triton.norms import _MAX_BLOCK_N, _as_rows, _launch_config, rms_norm_rows
from fxllm.quantization.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE

_CHUNK = 2048  # SiLU-and-mul columns per step of a row's two-pass walk
# Rows up to this (power-of-2) width are held in registers and read once (Llama-3.1-8B's 14,336 -> 16,384,
# 16 warps: 32 values per thread per operand); wider rows walk twice. benchmarks/gpu_fp8.py (fused_quant)
# times both on the 8B shape (`fused_2pass` sets this to 0), which is how the default is to be chosen.
ONE_PASS_MAX = 16384
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the unquantized output's dtype


@triton.jit
def _round_to(v, ROUND: tl.constexpr):
    """v (float32) rounded to the unquantized output's dtype and back, as the unfused op stores it."""
    if ROUND == 1:
        v = v.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _quantize_row(v, scale, inv, q_ptrs, mask, QMAX: tl.constexpr, RECIP: tl.constexpr, CLAMP: tl.constexpr):
    """v / scale (IEEE), clamped to +-QMAX (CLAMP) and cast to the e4m3 store; with RECIP the quotient is
    v * inv plus one exact FMA correction (GatedVariant says why)."""
    if RECIP:
        q0 = v * inv
        # -x as x * -1.0: Triton's unary minus is 0 - x, which turns -0 into +0 (the e4m3 byte of -0 is 0x80).
        q = tl.fma(tl.fma(q0, scale, v * -1.0) * -1.0, inv, q0)
    else:
        q = tl.math.div_rn(v, scale)
    if CLAMP:
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)


# `n_rows` changes every step: no variant per value class (norms.py does the same).
@triton.jit(do_not_specialize=["n_rows"])
def _add_rms_norm_fp8_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    q_ptr,
    s_ptr,
    sum_ptr,
    n_rows,
    n_cols,
    stride_x,
    stride_r,
    stride_q,
    stride_sum,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROUND: tl.constexpr,
    QMAX: tl.constexpr,
    MIN_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    # norms.py's operations exactly (the same helper), then one rounding to ROUND.
    out = _round_to(
        rms_norm_rows(
            x_ptr,
            r_ptr,
            w_ptr,
            sum_ptr,
            rows,
            cols,
            mask,
            n_cols,
            stride_x,
            stride_r,
            stride_sum,
            eps,
            HAS_RESIDUAL,
        ),
        ROUND,
    )
    # Masked columns are 0 (x, r and w load 0), so they leave the amax alone.
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(out), axis=1), QMAX), MIN_S)
    tl.store(s_ptr + rows, scale, mask=row_ok)
    q_ptrs = q_ptr + rows[:, None] * stride_q + cols[None, :]
    _quantize_row(out, scale[:, None], scale[:, None], q_ptrs, mask, QMAX, False, True)  # RECIP off, CLAMP on


@triton.jit
def _act_mul(g_ptrs, u_ptrs, mask, ACT: tl.constexpr, ROUND: tl.constexpr, EXP2: tl.constexpr):
    """activations.py's act(gate) * up (0 silu, 1 erf gelu, 2 tanh gelu), then one rounding."""
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    if EXP2 and ACT == 0:
        # tl.exp(-g) is (0 - g) * log2(e) then ex2.approx.f32; this is g * -log2(e) (the same float32 product)
        # then ex2.approx.ftz.f32: bit for bit the same 1 + exp(-g) (GatedVariant.exp2 says why).
        a = g / (1.0 + tl.math.exp2(g * -1.4426950408889634))
    else:
        a = gated_activation(g, ACT)
    return _round_to(a * u, ROUND)


@triton.jit
def _row_scale(amax, QMAX: tl.constexpr, MIN_S: tl.constexpr, RECIP: tl.constexpr):
    """The row's scale (amax / QMAX, IEEE, floored at MIN_S) and, for RECIP, its IEEE reciprocal."""
    scale = tl.maximum(tl.math.div_rn(amax, QMAX), MIN_S)
    if RECIP:
        inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    else:
        inv = scale
    return scale, inv


@triton.jit
def _gated_fp8_kernel(
    g_ptr,
    u_ptr,
    q_ptr,
    s_ptr,
    n_cols,
    stride_g,
    stride_u,
    stride_q,
    ACT: tl.constexpr,
    ROUND: tl.constexpr,
    QMAX: tl.constexpr,
    MIN_S: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,  # BLOCK >= n_cols: the row stays in registers, read once
    RECIP: tl.constexpr = False,  # GatedVariant's options; the defaults are the plain kernel
    EXP2: tl.constexpr = False,
    CLAMP: tl.constexpr = True,
):
    row = tl.program_id(0).to(tl.int64)
    g_row, u_row, q_row = g_ptr + row * stride_g, u_ptr + row * stride_u, q_ptr + row * stride_q
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        v = _act_mul(g_row + cols, u_row + cols, mask, ACT, ROUND, EXP2)
        scale, inv = _row_scale(tl.max(tl.abs(v), axis=0), QMAX, MIN_S, RECIP)
        tl.store(s_ptr + row, scale)
        _quantize_row(v, scale, inv, q_row + cols, mask, QMAX, RECIP, CLAMP)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            amax = tl.maximum(
                amax, tl.abs(_act_mul(g_row + cols, u_row + cols, mask, ACT, ROUND, EXP2))
            )  # masked: 0
        scale, inv = _row_scale(tl.max(amax, axis=0), QMAX, MIN_S, RECIP)
        tl.store(s_ptr + row, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            v = _act_mul(g_row + cols, u_row + cols, mask, ACT, ROUND, EXP2)
            _quantize_row(v, scale, inv, q_row + cols, mask, QMAX, RECIP, CLAMP)


def _outputs(like: Tensor) -> tuple[Tensor, Tensor]:
    q = torch.empty(like.shape, dtype=FP8_DTYPE, device=like.device)
    scale = torch.empty((*like.shape[:-1], 1), dtype=torch.float32, device=like.device)
    return q, scale


def norm_supported(x: Tensor, residual: Tensor | None, weight: Tensor) -> bool:
    """Whether the (fused add +) RMSNorm kernel takes these operands (else the reference is lowered)."""
    residual = x if residual is None else residual
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), weight.dtype)
    return (
        x.dim() >= 1
        and residual.dim() == x.dim()  # only static sizes: comparing symbolic rows would add a guard
        and residual.shape[-1] == x.shape[-1]
        and tuple(weight.shape) == (x.shape[-1],)
        and out_dtype in _ROUND
        and triton.next_power_of_2(x.shape[-1]) <= _MAX_BLOCK_N
    )


def silu_supported(gate: Tensor, up: Tensor) -> bool:
    """Whether the SiLU-and-mul kernel takes these operands (same shape, a float output dtype)."""
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    return (
        gate.dim() >= 1
        and gate.dim() == up.dim()  # only static sizes (see norm_supported)
        and gate.shape[-1] == up.shape[-1]
        and gate.shape[-1] > 0
        and out_dtype in _ROUND
    )


def _launch_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, summed: Tensor | None
) -> tuple[Tensor, Tensor]:
    n_cols = x.shape[-1]
    in_dtype = summed.dtype if summed is not None else x.dtype
    q, scale = _outputs(x)
    x2 = _as_rows(x)
    r2 = _as_rows(residual) if residual is not None else x2
    q2 = q.view(-1, n_cols)
    sum2 = summed.view(-1, n_cols) if summed is not None else q2
    n_rows = x2.shape[0]
    if n_rows == 0:
        return q, scale
    block_r, block_n, num_warps = _launch_config(n_cols)
    _add_rms_norm_fp8_kernel[(triton.cdiv(n_rows, block_r),)](
        x2, r2, weight.contiguous(), q2, scale.view(-1), sum2, n_rows, n_cols,
        x2.stride(0), r2.stride(0), q2.stride(0), sum2.stride(0), eps, HAS_RESIDUAL=residual is not None,
        ROUND=_ROUND[torch.promote_types(in_dtype, weight.dtype)], QMAX=FP8_MAX, MIN_S=MIN_SCALE,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return q, scale


def fused_add_rms_norm_fp8(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton (e4m3 rms_norm(x + residual), per-token scale, x + residual) in one pass over memory."""
    if residual.shape != x.shape or not norm_supported(x, residual, weight):
        raise ValueError(f"fused_add_rms_norm_fp8: unsupported operands {tuple(x.shape)} {x.dtype} / "
                         f"{tuple(residual.shape)} / {tuple(weight.shape)}; the lowering checks norm_supported")  # fmt: skip
    summed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    q, scale = _launch_norm(x, residual, weight, eps, summed)
    return q, scale, summed


def rms_norm_fp8(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Triton (e4m3 rms_norm(x), per-token scale) in one pass over memory."""
    if not norm_supported(x, None, weight):
        raise ValueError(f"rms_norm_fp8: unsupported operands {tuple(x.shape)} {x.dtype} / "
                         f"{tuple(weight.shape)}; the lowering checks norm_supported")  # fmt: skip
    return _launch_norm(x, None, weight, eps, None)


_ACTS = {"silu": 0, "none": 1, "tanh": 2}  # activations.py's codes


@dataclass(frozen=True)
class GatedVariant:
    """Launch-time options of the gated FP8 kernel (issue 15); the defaults are the plain kernel.

    Each writes the plain kernel's e4m3 bytes and scales bit for bit (tests/test_fp8_fused_variants.py) for
    every finite row; a row whose act * up overflows float32 to inf (or holds NaN) has scale inf / NaN, and
    its bytes, garbage either way, differ (recip: NaN for the whole row; clamp=False: NaN for that element):
    recip: q = v / scale as q0 = v * inv, inv = div_rn(1, scale) once per row, then one exact FMA
      correction q0 + (v - q0 * scale) * inv (Markstein's; div.rn's own fast path is this sequence with an
      approximate reciprocal, behind a per-element range check and slow-path branch). Checked against
      IEEE division for every (amax, v) pair of bfloat16 and of float16 values with |v| <= amax (1.07e9 /
      1.01e9 pairs, benchmarks/RESULTS.md, 2026-11-28 silufp8): equal e4m3 bytes in all; the float32
      quotients differ only below 1.1e-22 (bfloat16 subnormal v: the rest term underflows; e4m3 +-0 either
      way, same sign). v * inv alone misses 44,554 / 46,108 of those bytes. float32 rows are not
      exhaustible, so they keep div_rn. (Triton's interpreter rounds tl.fma twice: the tests patch it.)
    exp2: silu's exp(-g) as exp2(g * -log2 e): tl.exp(-g) compiles to (0 - g) * log2 e then ex2.approx.f32,
      this to g * -log2 e (the same float32 product up to the sign of zero, and ex2(+-0) = 1) then
      ex2.approx.ftz.f32, the same MUFU.EX2 on the same input minus the fix-up that keeps results below
      2^-126 subnormal; 1 + e rounds those to 1 either way. Compiled only: the interpreter's numpy
      exp2 and exp differ in the last bits, so there it keeps tl.exp.
    clamp=False: no +-448 clamp before the cast: |v| <= amax makes |q| <= 448 (1 + 2^-24), which the
      saturating e4m3 cast rounds to 448 anyway.
    warps / maxnreg: warps per one-pass row (None: the plain kernel's 16) and ptxas's register cap, which sets
      how many rows an SM holds (sm_90: 64K registers, 2,048 threads) and, below ~64, how late ptxas
      issues the row's loads (it spreads them through the math to save registers).
    """

    recip: bool = False
    exp2: bool = False
    clamp: bool = True
    warps: int | None = None
    maxnreg: int | None = None


# benchmarks/gpu_fp8_fused.py times each next to the default (sm_90 compiles: benchmarks/RESULTS.md, silufp8).
GATED_VARIANTS = {
    "plain": GatedVariant(),
    "recip": GatedVariant(recip=True),  # 51 registers, 2 rows per SM
    "lean": GatedVariant(recip=True, exp2=True, clamp=False, maxnreg=64),  # 2 rows per SM, loads first
    "lean_w32": GatedVariant(recip=True, exp2=True, clamp=False, warps=32, maxnreg=32),  # 2 x 32 warps / SM
    "lean_w8": GatedVariant(recip=True, exp2=True, clamp=False, warps=8, maxnreg=80),  # 3 rows per SM
}
# SiLU-and-mul + FP8's default. H200, 14,336 columns, us at M = 1 / 256 / 1,000 / 2,048 / 8,192 (gpu_fp8.py
# --sections fused_quant, fifteenth session): plain 6.5 / 11.1 / 35.4 / 65.5 / 236.2, lean 3.8 / 6.2 / 22.3 /
# 39.9 / 151.0 (lean_w32 21.2 at 1,000 but 169.9 at 8,192), the same bytes and scales. gelu keeps the plain
# kernel (its variants were not measured).
DEFAULT_SILU_VARIANT = "lean"


def _interpreted() -> bool:
    return type(_gated_fp8_kernel).__name__ == "InterpretedFunction"


def _gated_fp8(
    gate: Tensor, up: Tensor, act: str, name: str, variant: GatedVariant = GATED_VARIANTS["plain"]
) -> tuple[Tensor, Tensor]:
    if gate.shape != up.shape or not silu_supported(gate, up):
        raise ValueError(f"{name}: unsupported operands {tuple(gate.shape)} {gate.dtype} / "
                         f"{tuple(up.shape)} {up.dtype}; the lowering checks silu_supported")  # fmt: skip
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    q, scale = _outputs(gate)
    n_cols = gate.shape[-1]
    g2, u2 = _as_rows(gate), _as_rows(up)
    q2 = q.view(-1, n_cols)
    if g2.shape[0] == 0:
        return q, scale
    width = triton.next_power_of_2(n_cols)
    one_pass = width <= ONE_PASS_MAX
    block = width if one_pass else min(_CHUNK, width)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    launch: dict[str, int] = {}
    if one_pass and block > 4096:  # the variants' launch applies to the wide rows it was chosen for
        num_warps = variant.warps or num_warps
        launch = {"maxnreg": variant.maxnreg} if variant.maxnreg and not _interpreted() else {}
    _gated_fp8_kernel[(g2.shape[0],)](
        g2, u2, q2, scale.view(-1), n_cols, g2.stride(0), u2.stride(0), q2.stride(0), ACT=_ACTS[act],
        ROUND=_ROUND[out_dtype], QMAX=FP8_MAX, MIN_S=MIN_SCALE, BLOCK=block, ONE_PASS=one_pass,
        RECIP=variant.recip and out_dtype != torch.float32, EXP2=variant.exp2 and not _interpreted(),
        CLAMP=variant.clamp, num_warps=num_warps, **launch,
    )  # fmt: skip
    return q, scale


def silu_and_mul_fp8(gate: Tensor, up: Tensor, variant: str = DEFAULT_SILU_VARIANT) -> tuple[Tensor, Tensor]:
    """Triton (e4m3 silu(gate) * up, per-token scale); gate and up may be strided slices of one GEMM output."""
    return _gated_fp8(gate, up, "silu", "silu_and_mul_fp8", GATED_VARIANTS[variant])


def gelu_and_mul_fp8(gate: Tensor, up: Tensor, approximate: str = "none") -> tuple[Tensor, Tensor]:
    """Triton (e4m3 gelu(gate, approximate) * up, per-token scale); approximate "none" (erf) or "tanh"."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_and_mul_fp8: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _gated_fp8(gate, up, approximate, "gelu_and_mul_fp8")
