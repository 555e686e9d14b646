"""The CUDA backends of fxllm::fp8_gemm vs its reference: the Triton weight stream (Triton's interpreter on
the CPU), torch._scaled_mm in each of its cases (the CPU build has one), and the lowering's choice per node.

Both form the reference's e4m3 x e4m3 products exactly and accumulate in float32, so they differ from it by
summation order and where the scales are applied: float32 outputs within 1e-5 relative. bfloat16 outputs:
the float32 sums differ by ~1e-7, which flips the bf16 rounding of the few values that sit at a rounding
boundary by one ulp (2^-8 relative); on these small outputs (<= 40 x 64) one flip alone is ~1e-4 relative,
so 1e-3 (the CPU's _scaled_mm measured 0 here: the same sums). On the H100 _scaled_mm's FP8 tensor-core
accumulation is not IEEE float32: the bare GEMMs were measured 6-7e-4 from the reference at K = 4096-14336
(benchmarks/RESULTS.md, "FP8 GEMMs"; the Triton stream 8e-7 to 6e-5), so CUDA bf16 allows 2e-3 for
_scaled_mm. A scale-layout bug (a transposed or misindexed scale) gives O(1) errors.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreted import DEVICE, interpreted

from fxllm.backends.registry import OpSite, choose_implementation
from fxllm.ops.fp8_gemm import fp8_gemm_reference
from fxllm.quantization.fp8 import quantize_activation, quantize_weight

gemv, fp8_gemm = interpreted("gemv", "fp8_gemm")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _case(m: int, n: int, k: int, dtype: torch.dtype, granularity: str, bias: bool, seed: int = 0):  # type: ignore[no-untyped-def]
    """Quantized operands on DEVICE: (xq, x_scale, weight, weight_scale, bias)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.1, 2, n)[:, None]
    q, scale = quantize_weight(w, granularity)
    xq, xs = quantize_activation(x)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    return xq.to(DEVICE), xs.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), b


TRITON_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
# _scaled_mm on the H100 accumulates the e4m3 products on FP8 tensor cores in an order of its own: a float32
# output differs from the float32 reference by 1.0e-4 (measured, 64 x 96 x 40 products), bf16 adds its rounding.
SCALED_MM_TOL = {
    torch.float32: 2e-4 if DEVICE == "cuda" else 1e-5,
    torch.bfloat16: 2e-3 if DEVICE == "cuda" else 1e-3,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k", "granularity", "bias"), [
    (1, 48, 64, "channel", False), (5, 32, 96, "tensor", True), (16, 48, 80, "channel", True),
    (37, 40, 72, "channel", False),  # M over one block of rows (3 blocks), N and K not multiples of 16
])  # fmt: skip
def test_triton_matches_the_reference(m, n, k, granularity, bias, dtype) -> None:  # type: ignore[no-untyped-def]
    xq, xs, q, scale, b = _case(m, n, k, dtype, granularity, bias)
    ref = fp8_gemm_reference(xq, xs, q, scale, b, dtype)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    # BLOCK_K 32: several K tiles, and a partial last one where K is not a multiple of it (72, 80, 96 % 64).
    gemv.launch_gemv(xq, q, b, out, xs.reshape(-1), scale.reshape(-1), block_k=32 if k % 32 else 64)
    assert rel(out, ref) <= TRITON_TOL[dtype]
    got = fp8_gemm.triton_gemm(
        xq.view(1, m, k), xs.view(1, m, 1), q, scale, b, dtype
    )  # the op's launch sizes
    assert got.shape == (1, m, n) and got.dtype == dtype
    assert rel(got.view(m, n), ref) <= TRITON_TOL[dtype]


@pytest.mark.skipif(DEVICE == "cpu" and not hasattr(torch, "_scaled_mm"), reason="no torch._scaled_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 40])  # M = 1: per-tensor cuBLASLt; 40: row-wise (bf16) or float32 out
@pytest.mark.parametrize("backend", ["scaled_mm_gemm", "scaled_mm_fast_accum_gemm"])
def test_scaled_mm_matches_the_reference(
    m: int, granularity: str, bias: bool, dtype: torch.dtype, backend: str
) -> None:
    """Both _scaled_mm backends (the fast-accumulation one sums K = 96 in one tensor-core chain, within the
    same tolerance: its reduced-precision accumulation matters over thousands of K, gpu_fp8.py measures it)."""
    xq, xs, q, scale, b = _case(m, 64, 96, dtype, granularity, bias, seed=1)
    ref = fp8_gemm_reference(xq, xs, q, scale, b, dtype)
    got = getattr(fp8_gemm, backend)(xq.view(-1, 4 if m % 4 == 0 else 1, 96), xs.view(-1, 4 if m % 4 == 0 else 1, 1),
                                     q, scale, b, dtype)  # fmt: skip
    assert got.dtype == dtype and got.numel() == m * 64
    assert rel(got.reshape(m, 64), ref) <= SCALED_MM_TOL[dtype]


@pytest.mark.skipif(DEVICE == "cpu" and not hasattr(torch, "_scaled_mm"), reason="no torch._scaled_mm")
def test_scaled_mm_static_input_scale() -> None:
    """A static per-tensor activation scale ([1]): per-tensor at M = 1 and with a per-tensor weight, else
    row-wise with the scale repeated per row."""
    for m, granularity in ((1, "channel"), (24, "channel"), (24, "tensor")):
        x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(DEVICE)
        static = torch.tensor([0.02], device=DEVICE)
        xq, xs = quantize_activation(x, static)
        q, scale = quantize_weight(
            torch.randn(64, 96, generator=torch.Generator().manual_seed(7)), granularity
        )
        q, scale = q.to(DEVICE), scale.to(DEVICE)
        ref = fp8_gemm_reference(xq, static, q, scale, None, torch.bfloat16)
        assert (
            rel(fp8_gemm.scaled_mm_gemm(xq, static, q, scale, None, torch.bfloat16), ref)
            <= SCALED_MM_TOL[torch.bfloat16]
        )
        assert (
            rel(fp8_gemm.triton_gemm(xq, static, q, scale, None, torch.bfloat16), ref)
            <= TRITON_TOL[torch.bfloat16]
        )
        assert xs.numel() == 1


def test_fp8_linear_through_the_split_matches_the_whole_op_reference() -> None:
    """quantize_activation (what the pass emits in ATen) + each backend == fp8_linear_reference."""
    from fxllm.ops.fp8_linear import fp8_linear_reference

    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEVICE)
    q, scale = quantize_weight(torch.randn(64, 96, generator=torch.Generator().manual_seed(8)))
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    ref = fp8_linear_reference(x, q, scale, None, None)
    xq, xs = quantize_activation(x)
    assert rel(fp8_gemm.triton_gemm(xq, xs, q, scale, None, x.dtype), ref) <= TRITON_TOL[x.dtype]
    if hasattr(torch, "_scaled_mm"):
        assert rel(fp8_gemm.scaled_mm_gemm(xq, xs, q, scale, None, x.dtype), ref) <= SCALED_MM_TOL[x.dtype]


def _site(xq, xs, q, scale, dtype=torch.bfloat16, device="cuda"):  # type: ignore[no-untyped-def]
    return OpSite("fp8_gemm", torch.device(device), (xq, xs, q, scale, None, dtype))


def test_lowering_picks_per_site() -> None:
    xq, xs, q, scale, _b = _case(4, 64, 96, torch.bfloat16, "channel", False)
    # Fast accumulation by default at every K (the engine measured it faster), plain where named.
    assert choose_implementation(_site(xq, xs, q, scale)).backend == "scaled_mm_fast_accum"
    assert choose_implementation(_site(xq, xs, q, scale), "scaled_mm").backend == "scaled_mm"
    assert choose_implementation(_site(xq, xs, q, scale), "triton").backend == "triton"
    long_q = torch.zeros(32, 14336, dtype=q.dtype)  # Llama-3.1-8B's down projection
    long_x, long_xs = torch.zeros(2, 14336, dtype=xq.dtype), torch.ones(2, 1)
    long_site = _site(long_x, long_xs, long_q, torch.ones(32, 1))
    assert choose_implementation(long_site).backend == "scaled_mm_fast_accum"
    assert choose_implementation(long_site, "scaled_mm").backend == "scaled_mm"
    # (One 128 x 128 block covering the whole weight is a per-tensor scale: 256 rows make two blocks.)
    block_q, block_scale = quantize_weight(torch.randn(256, 96), "block")
    assert choose_implementation(_site(xq, xs, block_q, block_scale)).backend == "torch"  # no block scales
    odd_q, odd_scale = quantize_weight(torch.randn(40, 90))
    odd_x, odd_xs = quantize_activation(torch.randn(2, 90))
    assert choose_implementation(_site(odd_x, odd_xs, odd_q, odd_scale)).backend == "triton"  # K % 16 != 0
    assert choose_implementation(_site(xq, xs, q, scale, device="cpu")).backend == "torch"
    # A static input scale as the quantization emits it ([1, 1]) in front of a 3-D activation.
    x3, static = xq.view(2, 2, 96), torch.tensor([0.02]).reshape(1, 1)
    assert choose_implementation(_site(x3, static, q, scale)).backend == "scaled_mm_fast_accum"
