"""GPU FP8 GEMMs vs fxllm::fp8_linear's reference, on the CPU: the Triton weight stream in Triton's
interpreter, torch._scaled_mm on the CPU build (it has one), and the lowering's choice per node.

Both compute the reference's products exactly (e4m3 x e4m3 in float32) with the same activation rounding,
so they differ from it by summation order and where the scales are applied: float32 outputs within 1e-5
relative, bfloat16 within 1e-2 (a few bf16 ulps of the output's own rounding).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fxllm.backends.triton as tb  # noqa: E402
from fxllm.backends.registry import OpSite, choose_implementation  # noqa: E402
from fxllm.backends.triton import fp8_gemm  # noqa: E402
from fxllm.ops.fp8_linear import fp8_linear_reference  # noqa: E402
from fxllm.quantization.fp8 import quantize_weight  # noqa: E402

if DEVICE == "cpu" and not isinstance(fp8_gemm._fp8_gemv_kernel, InterpretedFunction):
    tb.patch_interpreter()  # imported as a GPU kernel before TRITON_INTERPRET=1 was set: re-import
    fp8_gemm = importlib.reload(fp8_gemm)
if DEVICE == "cpu":
    tb.patch_interpreter()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _case(m: int, n: int, k: int, dtype: torch.dtype, granularity: str, bias: bool, seed: int = 0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.1, 2, n)[:, None]
    q, scale = quantize_weight(w, granularity)
    b = (torch.randn(n, generator=gen).to(dtype).to(DEVICE)) if bias else None
    return x, q.to(DEVICE), scale.to(DEVICE), b


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k", "granularity", "bias"), [
    (1, 48, 64, "channel", False), (5, 32, 96, "tensor", True), (16, 48, 80, "channel", True),
])  # fmt: skip
def test_triton_weight_stream_matches_the_reference(m, n, k, granularity, bias, dtype) -> None:  # type: ignore[no-untyped-def]
    x, q, scale, b = _case(m, n, k, dtype, granularity, bias)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    xs = x.abs().amax(-1).float().div(448.0).clamp(min=1.0 / (448 * 512))
    # BLOCK_K 32: several K tiles, and a partial last one where K is not a multiple of it (80, 96 % 64).
    fp8_gemm.fp8_gemv_out(x, xs, q, scale.reshape(-1), b, out, block_k=32 if k % 32 else 64)
    ref = fp8_linear_reference(x, q, scale, b, None)
    assert rel(out, ref) <= TOL[dtype]
    assert rel(fp8_gemm.fp8_linear(x, q, scale, b), ref) <= TOL[dtype]  # the op's own launch sizes


@pytest.mark.skipif(DEVICE == "cpu" and not hasattr(torch, "_scaled_mm"), reason="no torch._scaled_mm")
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_scaled_mm_matches_the_reference(granularity: str) -> None:
    x, q, scale, b = _case(40, 64, 96, torch.float32, granularity, True, seed=1)
    ref = fp8_linear_reference(x, q, scale, b, None)
    assert rel(fp8_gemm.scaled_mm_linear(x.view(4, 10, 96), q, scale, b).view(40, 64), ref) <= 1e-5
    static = torch.tensor([0.02], device=DEVICE)  # static per-tensor activation scale
    ref = fp8_linear_reference(x, q, scale, None, static)
    assert rel(fp8_gemm.scaled_mm_linear(x, q, scale, None, static), ref) <= 1e-5


def test_lowering_picks_per_site() -> None:
    x, q, scale, b = _case(4, 64, 96, torch.bfloat16, "channel", False)
    cuda = torch.device("cuda")
    assert choose_implementation(OpSite("fp8_linear", cuda, (x, q, scale, b, None))).backend == "triton"
    assert choose_implementation(OpSite("fp8_linear", cuda, (x, q, scale, b, None)), "scaled_mm").backend == (
        "scaled_mm"
    )
    # (One 128 x 128 block covering the whole weight is a per-tensor scale: 256 rows make two blocks.)
    block_q, block_scale = quantize_weight(torch.randn(256, 96), "block")
    site = OpSite("fp8_linear", cuda, (x, block_q, block_scale, None, None))
    assert choose_implementation(site).backend == "torch"  # no 128 x 128 block scales in _scaled_mm
    odd_q, odd_scale = quantize_weight(torch.randn(40, 90))
    site = OpSite(
        "fp8_linear", cuda, (torch.randn(2, 90, dtype=torch.bfloat16), odd_q, odd_scale, None, None)
    )
    assert choose_implementation(site).backend == "torch"  # K % 16 != 0
    assert choose_implementation(
        OpSite("fp8_linear", torch.device("cpu"), (x, q, scale, b, None))
    ).backend == ("torch")
