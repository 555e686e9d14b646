"""The SiLU-and-mul + FP8 kernel's launch-time variants (issue 15; quant_fused.GATED_VARIANTS): each must write
the plain kernel's e4m3 bytes and scales bit for bit (float32, bfloat16, float16 rows; one-pass and
two-pass widths; 1 and 3 rows), on the GPU or in Triton's interpreter.

The rows are built so that a wrong division shows: silu(32) is exactly 32 (1 + exp(-32) rounds to 1), so
gate = 32, up = v / 32 puts any 16-bit value v into the activated row. One row holds, for an amax that has
many of them, the values whose quotient v / scale a plain v * (1 / scale) rounds to another e4m3 byte
(60 per bfloat16 amax, 126 per float16 one), and -0 (e4m3 0x80). The interpreter's tl.fma rounds twice
(x * y + z in float32); the GPU's fma.rn once: the fixture below makes the interpreter round once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import pytest
import torch
from triton_quant_fused import DEVICE, activations, quant_fused

from fxllm.quantization.fp8 import FP8_MAX, MIN_SCALE

# Importable here: triton_quant_fused skipped this module where triton is missing and set TRITON_INTERPRET.
interpreter = pytest.importorskip("triton.runtime.interpreter")

VARIANTS = [name for name in quant_fused.GATED_VARIANTS if name != "plain"]
HARD_AMAX = {torch.bfloat16: 392.0, torch.float16: 13.34375, torch.float32: 392.0}


def exact_fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma rounded once: the float64 product is exact, the float64 sum is made round-to-odd (TwoSum
    error), and rounding that to float32 (53 >= 24 + 2 bits) is the correct rounding of a * b + c."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


@pytest.fixture(autouse=True)
def _fma_rounds_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if DEVICE == "cpu":

        def create_fma(self, x, y, z):  # type: ignore[no-untyped-def]
            assert z.data.dtype == np.float32, z.data.dtype
            out = exact_fma(np.asarray(x.data), np.asarray(y.data), np.asarray(z.data))
            return interpreter.TensorHandle(out, z.dtype.scalar)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fma", create_fma)
    yield


def test_exact_fma_rounds_once() -> None:
    gen = np.random.default_rng(0)
    a = (gen.standard_normal(3000) * 2.0 ** gen.integers(-30, 30, 3000)).astype(np.float32)
    b = gen.standard_normal(3000).astype(np.float32)
    c = (-(a * b) * (1 + 1e-6 * gen.standard_normal(3000))).astype(np.float32)  # cancellation: the hard case
    got = exact_fma(a, b, c)
    for x, y, z, r in zip(a, b, c, got, strict=True):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        lo = np.nextafter(r, np.float32(-np.inf))
        hi = np.nextafter(r, np.float32(np.inf))
        err = abs(Fraction(float(r)) - exact)
        assert err <= abs(Fraction(float(lo)) - exact) and err <= abs(Fraction(float(hi)) - exact)
    naive = a * b + c  # float32: two roundings, what the interpreter does unpatched
    assert (naive != got).mean() > 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_recip_quotient_equals_ieee_division(dtype: torch.dtype) -> None:
    """The recip variant's arithmetic (quant_fused._quantize_row, emulated exactly on the CPU) against IEEE
    division, e4m3 bytes, for every v with |v| <= amax: by default the amax of one binade, [1, 2) (the other
    binades scale v, amax, scale and the quotient by the same power of 2, barring underflow); every amax
    with FXLLM_EXHAUSTIVE=1 (~4 min per dtype on 2 cores; measured: no byte differs, benchmarks/RESULTS.md)."""
    every = os.environ.get("FXLLM_EXHAUSTIVE") == "1"
    vals = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    vals = vals[vals.isfinite()]
    pos = vals[vals > 0].sort().values
    amaxes = pos if every else pos[(pos >= 1) & (pos < 2)]
    pairs = missed = 0
    for chunk in amaxes.split(32):
        amax = chunk[:, None]
        scale = torch.maximum(amax / FP8_MAX, torch.tensor(MIN_SCALE))  # float32, IEEE: div_rn
        v = vals[None, :].expand(amax.shape[0], -1)
        keep = v.abs() <= amax
        v, scale = v[keep].numpy(), scale.expand_as(keep)[keep].numpy()
        inv = np.float32(1.0) / scale
        q0 = v * inv
        q = exact_fma(-exact_fma(q0, scale, -v), inv, q0)
        got, ref = _e4m3(torch.from_numpy(q)), _e4m3(torch.from_numpy(v / scale))
        pairs += v.size
        assert torch.equal(got, ref), int((got != ref).sum())
        missed += int((_e4m3(torch.from_numpy(q0)) != ref).sum())
    assert pairs > (10**9 if every else 4 * 10**6) and missed > 0  # without the correction bytes differ


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def _hard_values(dtype: torch.dtype, amax: float) -> torch.Tensor:
    """The values v (|v| <= amax, of dtype) whose e4m3 byte of v * (1 / scale) is not that of v / scale."""
    value_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    vals = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(value_dtype).float()
    vals = vals[vals.isfinite() & (vals.abs() <= amax)]
    vals = vals[(vals / 32).to(value_dtype).float() * 32 == vals]  # up = v / 32 exact (no float16 subnormal)
    scale = torch.maximum(torch.tensor(amax) / FP8_MAX, torch.tensor(MIN_SCALE))
    return vals[_e4m3(vals * (1.0 / scale)) != _e4m3(vals / scale)]


def _rows(dtype: torch.dtype, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up (strided halves of one [rows, 2 * cols]): row 0 the hard values, then random rows."""
    gen = torch.Generator().manual_seed(n_cols + n_rows)
    merged = torch.randn(n_rows, 2 * n_cols, generator=gen) * 2
    amax = HARD_AMAX[dtype]
    hard = _hard_values(dtype, amax)
    values = torch.cat([torch.tensor([amax, -0.0]), hard.repeat(n_cols // hard.numel() + 1)])[:n_cols]
    merged[0, :n_cols], merged[0, n_cols:] = 32.0, values / 32
    merged = merged.to(dtype).to(DEVICE)
    return merged[:, :n_cols], merged[:, n_cols:]


def test_the_hard_row_is_hard() -> None:
    """The crafted row's activation is the chosen values, and a plain reciprocal gets >= 60 of them wrong."""
    for dtype in (torch.bfloat16, torch.float16):
        assert _hard_values(dtype, HARD_AMAX[dtype]).numel() >= 60
        gate, up = _rows(dtype, 1, 300)
        act = activations.silu_and_mul(gate, up).float().cpu()[0]
        assert float(act[0]) == HARD_AMAX[dtype] and str(float(act[1])) == "-0.0"
        assert torch.equal(act[2:], _hard_values(dtype, HARD_AMAX[dtype]).repeat(5)[:298])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_cols", [100, 14336, 20000])  # 20000: wider than ONE_PASS_MAX, the two-pass walk
@pytest.mark.parametrize("n_rows", [1, 3])
def test_variants_write_the_plain_kernels_bytes(dtype: torch.dtype, n_cols: int, n_rows: int) -> None:
    gate, up = _rows(dtype, n_rows, n_cols)
    q, scale = quant_fused.silu_and_mul_fp8(gate, up, variant="plain")
    assert float(scale[0]) == max(HARD_AMAX[dtype] / FP8_MAX, MIN_SCALE) or dtype == torch.float32
    assert int(q[0, 1].view(torch.uint8)) == 0x80  # -0 keeps its sign
    for name in VARIANTS:
        vq, vscale = quant_fused.silu_and_mul_fp8(gate, up, variant=name)
        assert torch.equal(vscale, scale), name
        differ = int((vq.view(torch.uint8) != q.view(torch.uint8)).sum())
        assert differ == 0, (name, differ)


def test_unknown_variant_and_the_defaults() -> None:
    assert quant_fused.GATED_VARIANTS["plain"] == quant_fused.GatedVariant()
    assert quant_fused.DEFAULT_SILU_VARIANT in VARIANTS  # the default is a measured variant, checked above
    with pytest.raises(KeyError):
        quant_fused.silu_and_mul_fp8(torch.ones(1, 8, device=DEVICE), torch.ones(1, 8, device=DEVICE), "nope")


_COMPILE = """
import json, os, re, subprocess, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxllm.backends.triton import quant_fused as qf
sig = {"g_ptr": "*bf16", "u_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"}
sig |= {n: "i32" for n in ("n_cols", "stride_g", "stride_u", "stride_q")}
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
out = {}
for name, v in qf.GATED_VARIANTS.items():  # Llama-3.1-8B's down projection input: 14,336 columns, one pass
    ce = {"ACT": 0, "ROUND": 1, "QMAX": 448.0, "MIN_S": qf.MIN_SCALE, "BLOCK": 16384, "ONE_PASS": True,
          "RECIP": v.recip, "EXP2": v.exp2, "CLAMP": v.clamp}
    src = ASTSource(fn=qf._gated_fp8_kernel, signature=sig | {k: "constexpr" for k in ce}, constexprs=ce,
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(8)})
    opts = {"num_warps": v.warps or 16} | ({"maxnreg": v.maxnreg} if v.maxnreg else {})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
    ptx = k.asm["ptx"]
    out[name] = {"regs": int(re.search(r"REG:(\\d+)", usage).group(1)), "div_rn": ptx.count("div.rn.f32"),
                 "ex2_ftz": ptx.count("ex2.approx.ftz.f32"), "fma": ptx.count("fma.rn.f32"),
                 "v4_loads": ptx.count("ld.global.v4"), "stack": int(re.search(r"STACK:(\\d+)", usage).group(1))}
print(json.dumps(out))
"""


def test_variants_compile_for_sm90_as_described() -> None:
    """Compiled for sm_90 (PTX + ptxas, no GPU needed), at the 8B shape: recip divides twice per row (the
    scale, its reciprocal) instead of once per element; exp2 is ex2.approx.ftz; maxnreg holds, no spills."""
    import json
    import subprocess
    import sys

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no nvidia backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled mode, not interpreted
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["plain"]["div_rn"] == 33 and result["plain"]["ex2_ftz"] == 0  # 32 per thread + the scale
    for name, variant in quant_fused.GATED_VARIANTS.items():
        got = result[name]
        assert got["v4_loads"] > 0 and got["stack"] == 0, (name, got)
        if variant.recip:
            assert got["div_rn"] == 2 and got["fma"] >= 2 * 16384 // (32 * (variant.warps or 16)), (name, got)
        assert (got["ex2_ftz"] > 0) == variant.exp2, (name, got)
        assert variant.maxnreg is None or got["regs"] <= variant.maxnreg, (name, got)
