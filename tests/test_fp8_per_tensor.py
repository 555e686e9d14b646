"""`quantization.activation_scheme: dynamic_tensor` (issue 15): one FP8 activation scale per GEMM input,
amax of the whole input / 448 at run time, instead of one per token.

The compiled model must equal the same model run eagerly with every linear (but the LM head) replaced by
quantize_activation_tensor + fp8_gemm_reference over the same e4m3 weights: the same ATen ops in the same
order on the CPU, so bit for bit (as tests/test_fp8_linear.py's per-token test). The GEMM backends take a
[1, 1] activation scale as one value for every row (checked against the reference within the bf16
rounding of the output, 1e-2, and float32's reassociation, 1e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxllm
from fxllm.config import load_config
from fxllm.models import load_model
from fxllm.ops.fp8_gemm import fp8_gemm_reference
from fxllm.quantization.fp8 import (
    FP8_MAX,
    MIN_SCALE,
    quantize_activation,
    quantize_activation_tensor,
    quantize_weight,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_one_scale_for_the_whole_input() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [900.0, 1.0, -3.0]])
    q, scale = quantize_activation_tensor(x)
    assert scale.shape == (1, 1) and float(scale) == pytest.approx(900.0 / FP8_MAX)
    assert float(q.float()[2, 0]) == FP8_MAX
    assert torch.equal(q.float()[0], (x[0] / scale[0]).to(q.dtype).float())  # every row over the one scale
    assert not q.float()[1].any()
    q, scale = quantize_activation_tensor(torch.zeros(2, 4, dtype=torch.bfloat16))
    assert float(scale) == pytest.approx(MIN_SCALE) and not q.float().any()
    # A row far below the tensor's amax loses precision against its own per-token scale: what the option trades.
    per_token = quantize_activation(x)
    assert not torch.equal(per_token[0].view(torch.uint8), quantize_activation_tensor(x)[0].view(torch.uint8))


def _reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every nn.Linear but lm_head: per-tensor e4m3 activation, channel e4m3 weight, reference GEMM."""
    ref = copy.deepcopy(model)
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            q, scale = quantize_weight(module.weight, "channel")

            def forward(x: torch.Tensor, q=q, scale=scale, bias=module.bias) -> torch.Tensor:  # type: ignore[no-untyped-def]
                xq, xs = quantize_activation_tensor(x)
                return fp8_gemm_reference(xq, xs, q, scale, bias, x.dtype)

            module.forward = forward  # type: ignore[method-assign]
    return ref


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return load_model("tiny-llama").model.eval()


def test_compiled_dynamic_tensor_equals_its_reference(tiny: torch.nn.Module) -> None:
    """Unmerged (as the reference model's separate projections), so each GEMM's input amax is the same."""
    ids = torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(5))
    quant = {"method": "fp8", "activation_scheme": "dynamic_tensor"}
    cm = fxllm.compile(
        copy.deepcopy(tiny), backend="eager", passes={"merge_linears": False}, quantization=quant
    )
    assert cm.fxllm_op_counts()["fxllm.fp8_gemm.default"] == 14
    notes = " | ".join(next(r for r in cm.pass_report.records if r.name == "quantize_fp8").notes)
    assert "per-tensor activation scales" in notes and "amax per tensor" in notes
    per_token = fxllm.compile(
        copy.deepcopy(tiny), backend="eager", passes={"merge_linears": False}, quantization="fp8"
    )
    with torch.no_grad():
        out, expected, token_out = cm(ids), _reference_model(tiny)(ids).logits, per_token(ids)
    assert torch.equal(out, expected)
    assert not torch.equal(out, token_out)  # the scheme changed the numerics


def test_scales_reach_the_gemms_as_one_value_and_the_fused_pass_leaves_them(tiny: torch.nn.Module) -> None:
    quant = {"method": "fp8", "activation_scheme": "dynamic_tensor", "fuse_activation_quant": "on"}
    cm = fxllm.compile(copy.deepcopy(tiny), backend="eager", passes={"lower_ops": False}, quantization=quant)
    counts = cm.fxllm_op_counts()
    assert (
        "fxllm.fused_add_rms_norm_fp8.default" not in counts
        and "fxllm.silu_and_mul_fp8.default" not in counts
    )
    gemms = cm.graph_module.graph.find_nodes(op="call_function", target=torch.ops.fxllm.fp8_gemm.default)
    assert len(gemms) == 8 and all(tuple(g.args[1].meta["val"].shape) == (1, 1) for g in gemms)
    notes = next(r for r in cm.pass_report.records if r.name == "fuse_fp8_quant").notes
    assert "8 quantization(s) left in ATen (dynamic_tensor activation scale)" in notes, notes


def test_gemm_backends_take_a_per_tensor_activation_scale() -> None:
    from fxllm.backends.triton import fp8_gemm

    torch.manual_seed(3)
    x, w = torch.randn(2, 5, 64) * torch.linspace(0.1, 4, 5)[:, None], torch.randn(48, 64) / 8
    wq, ws = quantize_weight(w)
    xq, xs = quantize_activation_tensor(x)
    ref = fp8_gemm_reference(xq, xs, wq, ws, None, torch.float32)
    assert fp8_gemm.supported(xq, xs, wq, ws, torch.float32)
    assert rel(fp8_gemm.scaled_mm_gemm(xq, xs, wq, ws, None, torch.float32), ref) <= 1e-5
    assert rel(fp8_gemm.scaled_mm_gemm(xq, xs, wq, ws, None, torch.bfloat16), ref) <= 1e-2


def test_config_accepts_the_scheme_and_names_bad_values() -> None:
    assert load_config(
        None, ["quantization.activation_scheme=dynamic_tensor"]
    ).quantization.activation_scheme == ("dynamic_tensor")
    with pytest.raises(ValueError, match=r"quantization\.activation_scheme"):
        load_config(None, ["quantization.activation_scheme=per_tensor"])
