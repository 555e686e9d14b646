"""FP8 activation quantization fused into fxllm's producers (issue 15): fxllm::fused_add_rms_norm_fp8,
rms_norm_fp8, silu_and_mul_fp8 and gelu_and_mul_fp8, their Triton kernels (Triton's interpreter on the CPU)
and the fuse_fp8_quant pass.

Tolerances. The kernels do their unfused kernel's operations (norms.py, activations.py) and then
quantize_activation's, with IEEE divisions, so against the unfused Triton kernel followed by
quantize_activation they are compared bit for bit (e4m3 bytes, scales, residual sum). Against the plain-
torch reference an e4m3 byte may differ by one step where the unquantized value differs by one ulp of its
dtype: the reference's F.silu rounds silu(gate) to bf16/fp16 before the multiply (two roundings; the
kernel, like activations.py, one) and its rsqrt is torch's, not numpy's. Where the row's amax element is
one ulp apart (bf16: <= 2^-7 relative) the scale is too, and values of that row sitting near an e4m3
rounding boundary move one step (6-12% of that element). So there: scales within 2^-7 relative, at most 5%
of the bytes differ and the dequantized tensors agree to 3e-2 relative (measured 2.2% and 1.2e-2). The
pass: on the CPU the fused ops lower to their references, the same ATen ops as the unfused path, so the
model's logits with the pass on equal those with it off exactly.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os

import pytest
import torch
from triton_quant_fused import DEVICE, activations, norms, quant_fused

import fxllm
import fxllm.backends.triton as tb
from fxllm.backends.registry import OpSite, choose_implementation
from fxllm.config import load_config
from fxllm.models import load_model
from fxllm.ops.fp8_fused import fused_add_rms_norm_fp8_reference, silu_and_mul_fp8_reference
from fxllm.passes.lower_ops import lowering_decisions
from fxllm.quantization.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, quantize_activation

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FUSED_OPS = ("fused_add_rms_norm_fp8", "rms_norm_fp8", "silu_and_mul_fp8", "gelu_and_mul_fp8")
FUSED = {f"fxllm.{op}.default" for op in FUSED_OPS}


def _bytes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _ieee_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation(x) with its scale's division IEEE on every device, as the kernels divide. On CUDA,
    torch divides by a Python number as a multiplication by the reciprocal, which can be 1 ulp off (H100,
    2026-11-28: the e4m3 bytes equal, scales 1 ulp apart); on the CPU both are the same."""
    if x.device.type == "cpu":
        return quantize_activation(x)
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.div(amax, torch.tensor(FP8_MAX, device=x.device)).clamp(min=MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _assert_same_quant(
    got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor], exact: bool = True
) -> None:
    assert got[0].dtype == FP8_DTYPE and got[1].dtype == torch.float32
    assert got[1].shape == expected[1].shape and got[0].shape == expected[0].shape
    if exact:
        assert torch.equal(_bytes(got[0]), _bytes(expected[0]))
        assert torch.equal(got[1], expected[1])
        return
    # float32 rows on the GPU: the fused and the unfused kernel are compiled apart, and ptxas may contract a
    # multiply-add in one and not the other, moving a normed value (so a row's amax) by an ulp (H100,
    # 2026-11-28: scales 1 ulp apart, 16-bit rows bit-equal). A wrong scale or byte moves these by >= 2^-4.
    assert float(((got[1] - expected[1]).abs() / expected[1]).max()) <= 2**-20
    assert float((_bytes(got[0]) != _bytes(expected[0])).float().mean()) <= 1e-3


def _exact(dtype: torch.dtype) -> bool:
    """Bit-equality holds for 16-bit rows everywhere and for float32 rows in the interpreter."""
    return DEVICE == "cpu" or dtype != torch.float32


def _assert_close_to_reference(
    got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]
) -> None:
    differ = float((_bytes(got[0]) != _bytes(ref[0])).float().mean())
    deq, deq_ref = got[0].float() * got[1], ref[0].float() * ref[1]
    rel = float((deq - deq_ref).norm() / deq_ref.norm())
    # Measured on the CPU: at most 2.2% of the bytes, rel 1.2e-2, scales 0.51% (SiLU in bfloat16).
    assert differ <= 0.05 and rel <= 3e-2, (differ, rel)
    assert float(((got[1] - ref[1]).abs() / ref[1]).max()) <= 2**-7  # one bf16 ulp of the row's amax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 4096])  # 96: several rows per program, masked columns
def test_add_rms_norm_fp8_kernel_equals_the_unfused_kernels(dtype: torch.dtype, hidden: int) -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, hidden + 8, generator=gen).to(dtype) * 3
    x = base[..., 4 : hidden + 4]  # row-strided input
    residual = torch.randn(4, 3, hidden, generator=gen).to(dtype)
    residual[1, 2] = -x[1, 2]  # a zero row: its scale is the floor, its e4m3 row zeros
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    q, scale, summed = quant_fused.fused_add_rms_norm_fp8(
        x.to(DEVICE), residual.to(DEVICE), weight.to(DEVICE), 1e-5
    )
    normed, summed_unfused = norms.fused_add_rms_norm(
        x.to(DEVICE), residual.to(DEVICE), weight.to(DEVICE), 1e-5
    )
    _assert_same_quant((q, scale), _ieee_quantize(normed), _exact(dtype))
    assert scale.shape == (4, 3, 1) and torch.equal(summed, summed_unfused)
    assert float(scale[1, 2]) == pytest.approx(MIN_SCALE) and not q[1, 2].float().any()
    rq, rs, rsum = fused_add_rms_norm_fp8_reference(x, residual, weight, 1e-5)
    _assert_close_to_reference((q.cpu(), scale.cpu()), (rq, rs))
    assert torch.equal(summed.cpu(), rsum)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 4096])
def test_rms_norm_fp8_kernel_equals_the_unfused_kernel(dtype: torch.dtype, hidden: int) -> None:
    from fxllm.ops.fp8_fused import rms_norm_fp8_reference

    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 3, hidden + 8, generator=gen) * 3).to(dtype)[..., 4 : hidden + 4].to(DEVICE)
    x[2, 1] = 0  # a zero row
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    q, scale = quant_fused.rms_norm_fp8(x, weight, 1e-5)
    _assert_same_quant((q, scale), _ieee_quantize(norms.rms_norm(x, weight, 1e-5)), _exact(dtype))
    assert scale.shape == (4, 3, 1) and float(scale[2, 1]) == pytest.approx(MIN_SCALE)
    _assert_close_to_reference((q.cpu(), scale.cpu()), rms_norm_fp8_reference(x.cpu(), weight.cpu(), 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [80, 2500])  # masked columns; two-pass: two chunks, the last one masked
@pytest.mark.parametrize("two_pass", [False, True])
def test_silu_and_mul_fp8_kernel_equals_the_unfused_kernels(
    dtype: torch.dtype, inter: int, two_pass: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if two_pass:  # the walk wide rows take (one pass holds rows up to ONE_PASS_MAX columns in registers)
        monkeypatch.setattr(quant_fused, "ONE_PASS_MAX", 0)
    gen = torch.Generator().manual_seed(1)
    merged = (torch.randn(5, 2 * inter, generator=gen) * 2).to(dtype).to(DEVICE)
    merged[3] = 0  # a zero row
    gate, up = merged[:, :inter], merged[:, inter:]  # two slices of one GEMM output, row stride 2I
    q, scale = quant_fused.silu_and_mul_fp8(gate, up)
    _assert_same_quant((q, scale), _ieee_quantize(activations.silu_and_mul(gate, up)))
    assert scale.shape == (5, 1) and float(scale[3]) == pytest.approx(MIN_SCALE)
    _assert_close_to_reference((q.cpu(), scale.cpu()), silu_and_mul_fp8_reference(gate.cpu(), up.cpu()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_mul_fp8_kernel_equals_the_unfused_kernel(dtype: torch.dtype, approximate: str) -> None:
    from fxllm.ops.fp8_fused import gelu_and_mul_fp8_reference

    merged = (torch.randn(5, 2 * 300, generator=torch.Generator().manual_seed(6)) * 2).to(dtype).to(DEVICE)
    gate, up = merged[:, :300], merged[:, 300:]
    q, scale = quant_fused.gelu_and_mul_fp8(gate, up, approximate)
    _assert_same_quant((q, scale), _ieee_quantize(activations.gelu_and_mul(gate, up, approximate)))
    ref = gelu_and_mul_fp8_reference(gate.cpu(), up.cpu(), approximate)
    _assert_close_to_reference((q.cpu(), scale.cpu()), ref)


def test_empty_rows_and_unsupported_operands() -> None:
    q, scale = quant_fused.silu_and_mul_fp8(
        torch.empty(0, 64, device=DEVICE), torch.empty(0, 64, device=DEVICE)
    )
    assert q.shape == (0, 64) and scale.shape == (0, 1)
    x = torch.randn(0, 32, device=DEVICE)
    q, scale, summed = quant_fused.fused_add_rms_norm_fp8(x, x, torch.ones(32, device=DEVICE), 1e-5)
    assert q.shape == (0, 32) and scale.shape == (0, 1) and summed.shape == (0, 32)
    with pytest.raises(ValueError, match="silu_supported"):
        quant_fused.silu_and_mul_fp8(torch.randn(2, 8), torch.randn(2, 6))


def test_the_lowering_picks_the_kernels_for_cuda_nodes_only() -> None:
    x, w = torch.empty(3, 4096, dtype=torch.bfloat16), torch.empty(4096, dtype=torch.bfloat16)
    gate = torch.empty(3, 14336, dtype=torch.bfloat16)
    sites = {
        "fused_add_rms_norm_fp8": (x, x, w, 1e-5),
        "rms_norm_fp8": (x, w, 1e-5),
        "silu_and_mul_fp8": (gate, gate),
        "gelu_and_mul_fp8": (gate, gate, "tanh"),
    }
    for op, args in sites.items():
        assert choose_implementation(OpSite(op, torch.device("cuda"), args)).backend == "triton"
        assert choose_implementation(OpSite(op, torch.device("cpu"), args)).backend == "torch"
    odd = (x, x, torch.empty(7, dtype=torch.bfloat16), 1e-5)  # a weight that does not fit the row
    assert (
        choose_implementation(OpSite("fused_add_rms_norm_fp8", torch.device("cuda"), odd)).backend == "torch"
    )


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return load_model("tiny-llama").model.eval()


def _fp8(fuse: str, **more: object) -> dict[str, object]:
    return {"method": "fp8", "fuse_activation_quant": fuse, **more}


@pytest.mark.parametrize("merged", [True, False])
def test_pass_puts_the_quantization_into_the_producers(tiny: torch.nn.Module, merged: bool) -> None:
    """tiny-llama (2 layers): layer 0's input RMSNorm (no residual add), 3 add + RMSNorms (layer 0's
    post-attention, layer 1's two) and 2 SiLU-and-muls feed FP8 GEMMs; the attention outputs stay in ATen.
    With q/k/v unmerged, the three quantizations of one normed activation share the fused op's output."""
    passes = {"lower_ops": False, "merge_linears": merged}
    cm = fxllm.compile(copy.deepcopy(tiny), backend="eager", passes=passes, quantization=_fp8("on"))
    counts = cm.fxllm_op_counts()
    assert counts["fxllm.fused_add_rms_norm_fp8.default"] == 3 and counts["fxllm.rms_norm_fp8.default"] == 1
    assert counts["fxllm.silu_and_mul_fp8.default"] == 2 and "fxllm.rms_norm.default" not in counts
    assert counts["fxllm.fused_add_rms_norm.default"] == 1  # the final norm feeds the float LM head
    assert counts["fxllm.fp8_gemm.default"] == (8 if merged else 14)
    gm = cm.graph_module
    fused_reads = sum(
        1
        for n in gm.graph.find_nodes(op="call_function", target=torch.ops.fxllm.fp8_gemm.default)
        if n.args[0].args[0].target in {getattr(torch.ops.fxllm, op).default for op in FUSED_OPS}
    )
    # Merged: qkv, gate_up and down of both layers; unmerged: q, k, v, gate, up, down each.
    assert fused_reads == (6 if merged else 12)
    amaxes = len(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.amax.default))
    assert amaxes == 2  # the two attention outputs (o_proj)
    notes = " | ".join(next(r for r in cm.pass_report.records if r.name == "fuse_fp8_quant").notes)
    assert "3 add + RMSNorm -> e4m3 fused" in notes and "2 SiLU-and-mul -> e4m3 fused" in notes
    assert "1 RMSNorm -> e4m3 fused (fxllm::rms_norm_fp8)" in notes
    assert "2 quantization(s) left in ATen (after attention.default (via reshape))" in notes


def test_logits_with_the_pass_equal_without(tiny: torch.nn.Module) -> None:
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(4))
    on = fxllm.compile(copy.deepcopy(tiny), backend="eager", quantization=_fp8("on"))
    off = fxllm.compile(copy.deepcopy(tiny), backend="eager", quantization=_fp8("off"))
    assert on.pass_report.matches("fuse_fp8_quant") == 6 and off.pass_report.matches("fuse_fp8_quant") == 0
    decisions = {d.op: d.target for d in lowering_decisions(on.graph_module)}
    assert decisions["fused_add_rms_norm_fp8"] == decisions["silu_and_mul_fp8"] == "inlined"
    with torch.no_grad():
        assert torch.equal(on(ids), off(ids))  # the inlined references are the unfused ATen ops


def test_gemma2_norms_and_geglu() -> None:
    """tiny-gemma2 (2 layers): sandwich norms are plain RMSNorms (the residual add comes after the post-norm),
    GeGLU with tanh gelu; 8 RMSNorms and 4 GeLU-and-muls feed GEMMs, the 4 attention outputs stay in ATen.
    On the CPU the logits equal those with the option off (same ATen ops)."""
    model = load_model("tiny-gemma2").model.eval()
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(4))
    on = fxllm.compile(copy.deepcopy(model), backend="eager", quantization=_fp8("on"))
    off = fxllm.compile(copy.deepcopy(model), backend="eager", quantization=_fp8("off"))
    notes = next(r for r in on.pass_report.records if r.name == "fuse_fp8_quant").notes
    assert notes[:3] == ["8 RMSNorm -> e4m3 fused (fxllm::rms_norm_fp8)",
                         "4 GeLU-and-mul -> e4m3 fused (fxllm::gelu_and_mul_fp8)",
                         "4 quantization(s) left in ATen (after attention.default (via reshape))"], notes  # fmt: skip
    with torch.no_grad():
        assert torch.equal(on(ids), off(ids))


def test_model_through_the_triton_kernels(tiny: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lowering's Triton path end to end: the fused ops (and fp8_gemm) lowered to their CUDA backends, run
    on the GPU, or on the CPU in the interpreter. Against the same model with the quantization in ATen (same GEMM backend):
    measured rel 1.8e-7 on the logits (float32: the interpreter's rsqrt and the kernels' summation order move
    a scale by ~1e-7 relative; a wrong scale or e4m3 byte would move them by >= 1e-3), bound 1e-5."""
    monkeypatch.setattr(tb, "supports", lambda site: site.device.type in ("cuda", "cpu"))  # read per call
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    on = fxllm.compile(copy.deepcopy(tiny).to(DEVICE), backend="eager", quantization=_fp8("on"))
    off = fxllm.compile(copy.deepcopy(tiny).to(DEVICE), backend="eager", quantization=_fp8("off"))
    targets = {d.op: d.target for d in lowering_decisions(on.graph_module)}
    assert targets["fused_add_rms_norm_fp8"] == "fxllm_triton.fused_add_rms_norm_fp8.default"
    assert targets["silu_and_mul_fp8"] == "fxllm_triton.silu_and_mul_fp8.default"
    with torch.no_grad():
        a, b = on(ids), off(ids)
    assert float((a - b).norm() / b.norm()) <= 1e-5 and torch.equal(a.argmax(-1), b.argmax(-1))


def test_auto_is_off_on_cpu_on_on_cuda_and_bad_values_name_the_key(tiny: torch.nn.Module) -> None:
    """auto: fused where it was measured faster (CUDA, an H200), left to Inductor on the CPU."""
    from fxllm.config import QuantizationConfig
    from fxllm.passes.fuse_fp8_quant import fuse_fp8_quant
    from fxllm.passes.registry import PassContext

    cm = fxllm.compile(copy.deepcopy(tiny), backend="eager", passes={"lower_ops": False}, quantization="fp8")
    assert not FUSED & set(cm.fxllm_op_counts())
    notes = next(r for r in cm.pass_report.records if r.name == "fuse_fp8_quant").notes
    assert any(
        "auto = off on cpu" in note and "8 activation quantization(s) stay in ATen" in note for note in notes
    )
    # The same pass over the same graph, told its nodes run on CUDA: auto fuses (the pass only rewrites the graph).
    cuda = PassContext(device=torch.device("cuda"), quantization=QuantizationConfig(method="fp8"))
    assert fuse_fp8_quant(cm.graph_module, cuda).num_matches > 0
    targets = {str(n.target) for n in cm.graph_module.graph.nodes if n.op == "call_function"}
    assert FUSED & targets, targets
    with pytest.raises(ValueError, match=r"quantization\.fuse_activation_quant"):
        load_config(None, ["quantization.fuse_activation_quant=yes"])


def test_explain_lists_the_fused_quantizations() -> None:
    from fxllm.serve.cli import main

    out = io.StringIO()
    args = ["compile", "tiny-llama", "--backend", "eager", "--explain", "--set", "quantization.method=fp8",
            "--set", "quantization.fuse_activation_quant=on"]  # fmt: skip
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    text = out.getvalue()
    assert "3 add + RMSNorm -> e4m3 fused (fxllm::fused_add_rms_norm_fp8)" in text, text
    assert "2 SiLU-and-mul -> e4m3 fused (fxllm::silu_and_mul_fp8)" in text
    assert sum(line.split()[1:2] == ["silu_and_mul_fp8"] for line in text.splitlines()) == 2  # per-node rows


_PTX_CHECK = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxllm.backends.triton import quant_fused as qf
consts = {"QMAX": 448.0, "MIN_S": qf.MIN_SCALE, "ROUND": 1}
norm_sig = {n: "*bf16" for n in ("x_ptr", "r_ptr", "w_ptr", "sum_ptr")} | {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32"}
norm_sig |= {n: "i32" for n in ("n_rows", "n_cols", "stride_x", "stride_r", "stride_q", "stride_sum")} | {"eps": "fp32"}
silu_sig = {"g_ptr": "*bf16", "u_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"}
silu_sig |= {n: "i32" for n in ("n_cols", "stride_g", "stride_u", "stride_q")}
current = {"RECIP": False, "EXP2": False, "CLAMP": True}  # GatedVariant's defaults (ASTSource takes no defaults)
cases = {  # the launches of Llama-3.1-8B's shapes: hidden 4,096 (8 warps), intermediate 14,336 (16; 8 for the walk)
    "norm": (qf._add_rms_norm_fp8_kernel, norm_sig, {"BLOCK_R": 1, "BLOCK_N": 4096, "HAS_RESIDUAL": True}, 8),
    "rms": (qf._add_rms_norm_fp8_kernel, norm_sig, {"BLOCK_R": 1, "BLOCK_N": 4096, "HAS_RESIDUAL": False}, 8),
    "silu_one_pass": (qf._gated_fp8_kernel, silu_sig, {"BLOCK": 16384, "ONE_PASS": True, "ACT": 0} | current, 16),
    "silu_two_pass": (qf._gated_fp8_kernel, silu_sig, {"BLOCK": 2048, "ONE_PASS": False, "ACT": 0} | current, 8),
    "gelu_tanh": (qf._gated_fp8_kernel, silu_sig, {"BLOCK": 16384, "ONE_PASS": True, "ACT": 2} | current, 16),
    "gelu_erf": (qf._gated_fp8_kernel, silu_sig, {"BLOCK": 2048, "ONE_PASS": False, "ACT": 1} | current, 8),
}
out = {}
for name, (fn, sig, more, warps) in cases.items():
    c = consts | more
    src = ASTSource(fn=fn, signature=sig | {k: "constexpr" for k in c}, constexprs=c)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
    out[name] = {"div_rn": ptx.count("div.rn.f32"), "e4m3": ptx.count("e4m3")}
print(json.dumps(out))
"""


def test_kernels_compile_for_the_h100() -> None:
    """The interpreter runs numpy, which broadcasts and converts anything: compile the kernels for sm_90 (to
    PTX; no GPU needed) at the 8B launch settings, and check they divide with div.rn and convert to e4m3."""
    import json
    import subprocess
    import sys

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no nvidia backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled mode, not interpreted
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"norm", "rms", "silu_one_pass", "silu_two_pass", "gelu_tanh", "gelu_erf"}
    assert all(r["div_rn"] > 0 and r["e4m3"] > 0 for r in result.values()), result
