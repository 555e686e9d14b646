"""`fxllm::packed_linear`: packing round trip, the C++ op `fxllm_cpu::packed_linear` against float64 (and
inside an Inductor-compiled graph), and the CPU pass."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tied_lm import TiedLM

import fxllm.ops  # noqa: F401
from fxllm.backends.cpu import linear as cpu_linear
from fxllm.ops.linear import pack_linear_weight, packed_linear_reference, unpack_linear_weight
from fxllm.passes.pack_linears import pack_linears
from fxllm.passes.registry import PassContext

# float32 sums of up to 1536 products: the kernel's order differs from float64's, ~1e-7 relative
# per term; 1e-5 leaves room. bfloat16 outputs are rounded once (relative 2^-9 = 2e-3 per element,
# 1e-3 or so over a norm), and bfloat16 inputs are exact in float32 products, so 4e-3 is enough.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-3}


NativeOp = Callable[[str], torch._ops.OpOverload]  # the `native_op` fixture (conftest.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 16, 50, 960])
def test_pack_round_trip(dtype: torch.dtype, n: int) -> None:
    weight = torch.randn(n, 64).to(dtype)
    assert torch.equal(unpack_linear_weight(pack_linear_weight(weight), n), weight)


def test_pack_rejects_odd_bfloat16_inputs() -> None:
    with pytest.raises(ValueError, match="even number of input features"):
        pack_linear_weight(torch.randn(16, 33).to(torch.bfloat16))


@pytest.mark.skipif(not cpu_linear.available(torch.float32), reason="needs an AVX-512 CPU and a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    # m 5..32 takes the tall 16-row tiles (21 = 16 + 5 rows); other m the 4x4 tiles
    ("m", "n", "k"),
    [(1, 960, 576), (3, 50, 64), (5, 17, 32), (16, 576, 1536), (21, 50, 64), (70, 33, 96)],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_float64(
    native_op: NativeOp, dtype: torch.dtype, m: int, n: int, k: int, with_bias: bool
) -> None:
    if not cpu_linear.available(dtype):
        pytest.skip(f"no {dtype} kernel on this CPU")
    gen = torch.Generator().manual_seed(m * n + k)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    x = torch.randn(2, m, k, generator=gen).to(dtype)  # a leading batch dim, as the graph has
    out = native_op("packed_linear")(x, pack_linear_weight(weight), n, bias)
    assert out.shape == (2, m, n) and out.dtype == dtype and out.is_contiguous()
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    error = ((out.double() - ref).norm() / ref.norm()).item()
    assert error < TOLERANCE[dtype], error
    # the reference implementation of the op agrees too (it is what runs without the kernel)
    assert torch.allclose(packed_linear_reference(x, pack_linear_weight(weight), n, bias).double(), ref,
                          rtol=0, atol=TOLERANCE[dtype] * ref.abs().max().item())  # fmt: skip


def test_kernel_reads_strided_rows(native_op: NativeOp) -> None:
    weight, wide = torch.randn(40, 64), torch.randn(7, 128)
    x = wide[:, :64]  # rows 128 apart
    out = native_op("packed_linear")(x, pack_linear_weight(weight), 40)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_kernel_hands_other_dtypes_to_the_reference(
    native_op: NativeOp, dtype: torch.dtype, with_bias: bool
) -> None:
    """Without a bias too: the old hand-off op dropped the defaulted argument and failed."""
    weight, x = torch.randn(40, 64).to(dtype), torch.randn(3, 64).to(dtype)
    bias = torch.randn(40).to(dtype) if with_bias else None
    out = native_op("packed_linear")(x, pack_linear_weight(weight), 40, bias)
    assert out.dtype == dtype and torch.equal(out, F.linear(x, weight, bias))


def test_inductor_compiles_a_graph_calling_the_op(native_op: NativeOp) -> None:
    """Inductor calls the C++ op as an opaque kernel (its fake gives the shapes) with a dynamic token count."""
    op = native_op("packed_linear")
    weight, bias = torch.randn(40, 64), torch.randn(40)
    packed = pack_linear_weight(weight)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(op(x * 2.0, packed, 40, bias)) + 1.0

    compiled = torch.compile(forward, backend="inductor", dynamic=True, fullgraph=True)
    for rows in (3, 7):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(compiled(x), torch.relu(F.linear(x * 2.0, weight, bias)) + 1.0,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_pass_rewrites_linears_and_keeps_tied_weights() -> None:
    if not cpu_linear.available(torch.float32):
        pytest.skip("needs an AVX-512 CPU and a C++ compiler")
    model = TiedLM().eval()
    ids = torch.randint(0, 100, (1, 9))
    gm = torch.export.export(model, (ids,)).run_decompositions({}).module()
    expected = model(ids)
    result = pack_linears(gm, PassContext(device=torch.device("cpu")))
    assert result.num_matches == 3
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.linear.default not in targets
    assert targets.count(torch.ops.fxllm.packed_linear.default) == 3
    # the embedding still reads the plain weight; the projections' plain weights are gone
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert not any("proj.weight" in str(t) or "down.weight" in str(t) for t in attrs)
    torch.testing.assert_close(gm(ids), expected, rtol=1e-5, atol=1e-5)


def test_pass_leaves_gpu_graphs_alone() -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    result = pack_linears(gm, PassContext(device=torch.device("cuda")))
    assert result.num_matches == 0 and "CPU-only" in result.notes[0]
