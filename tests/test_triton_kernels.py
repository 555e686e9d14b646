"""Triton kernels vs the reference ops, run on CPU through Triton's interpreter (TRITON_INTERPRET=1).

Tolerances on ||out - ref|| / ||ref|| (see fxllm.backends.triton.selfcheck.TOL): float32 1e-5, since
every kernel does the reference's float32 operations up to summation order (attention uses IEEE,
not tf32, dots); bfloat16 1e-2, since one bf16 rounding of the output is ~2e-3 relative and the
attention kernels also round P to bf16 as the reference does. Outputs are NaN-poisoned first and
unused cache slots hold NaN, so unwritten outputs and stray reads fail.
"""

from __future__ import annotations

import sys

import pytest
import torch

# On a CPU-only machine the kernels run in Triton's interpreter (tests/triton_interpreted.py); with a GPU the
# same tests run the compiled kernels on CUDA.
from triton_interpreted import DEVICE, interpreted, record_launches

import fxllm.backends.triton as tb
from fxllm.backends.registry import OpSite, choose_implementation, op_backends
from fxllm.backends.triton.paged_attention_prefill import prefill_launch
from fxllm.ops import paged_attention_reference, rms_norm_reference, rotary_embedding_reference

activations, gemv, norms, paged_attention, rotary, selfcheck = interpreted(
    "activations", "gemv", "norms", "paged_attention", "rotary", "selfcheck"
)

DTYPES = [torch.float32, torch.bfloat16]
OPS = (
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "gelu_and_mul",
    "paged_attention",
)
# Small shapes with block sizes that force several query blocks, KV tiles and KV splits per sequence.
SMALL_LAUNCH = {"block_m": 16, "block_n": 16, "num_splits": 3}


def _assert_ok(result: dict) -> None:
    assert result["ok"], result


def test_registered_as_their_own_ops_for_cuda_nodes() -> None:
    assert tb.AVAILABLE
    for op in OPS:
        assert "triton" in op_backends(op)
        assert hasattr(torch.ops.fxllm_triton, op)  # fxllm_triton::<op>, not a kernel on fxllm::<op>
        assert choose_implementation(OpSite(op, torch.device("cuda"))).backend == "triton"
        assert choose_implementation(OpSite(op, torch.device("cpu"), (torch.empty(1),))).backend != "triton"
    # A preference the node's device does not support fails, naming the choices.
    with pytest.raises(ValueError, match="does not support"):
        choose_implementation(OpSite("rms_norm", torch.device("cpu")), "triton")


def test_import_without_triton_registers_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert tb._register() is False


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hidden"), [(5, 96), (3, 256)])
def test_norms(dtype: torch.dtype, rows: int, hidden: int) -> None:
    for result in selfcheck.check_norms(DEVICE, dtype, rows, hidden):
        _assert_ok(result)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_strided(dtype: torch.dtype) -> None:
    _assert_ok(selfcheck.check_rotary(DEVICE, dtype, batch=2, hq=4, hk=2, seq=5, dim=32))
    # D/2 = 12 is not a power of 2: masked half-dim tiles.
    _assert_ok(selfcheck.check_rotary(DEVICE, dtype, batch=1, hq=4, hk=4, seq=3, dim=24))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "none", "tanh"])
def test_gated_activations(dtype: torch.dtype, act: str) -> None:
    _assert_ok(selfcheck.check_gated(DEVICE, dtype, rows=5, inter=80, act=act))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(selfcheck.paged_cases(True, torch.float32, DEVICE)))
def test_paged_attention(dtype: torch.dtype, case: str) -> None:
    c = selfcheck.paged_cases(True, dtype, DEVICE)[case]
    _assert_ok(selfcheck.check_paged(c, case, **SMALL_LAUNCH))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["decode gqa", "decode padded seq", "decode window+softcap+sinks"])
@pytest.mark.parametrize("swap_ab", [True, False])
def test_paged_attention_one_split(
    dtype: torch.dtype, case: str, swap_ab: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One split: the swap-AB loops write the output themselves (DIRECT: normalised, the sink's share, zeros for
    # padding) and no combine kernel runs; the default loop keeps partials + combine (it measured faster).
    combines: list[tuple] = []
    kernel = paged_attention._combine_kernel

    class Spy:
        def __getitem__(self, grid: tuple) -> object:
            combines.append(grid)
            return kernel[grid]

    monkeypatch.setattr(paged_attention, "_combine_kernel", Spy())
    c = selfcheck.paged_cases(True, dtype, DEVICE)[case]
    _assert_ok(selfcheck.check_paged(c, case, block_n=32, num_splits=1, swap_ab=swap_ab))
    assert len(combines) == (0 if swap_ab else 1)


@pytest.mark.parametrize("case", ["decode gqa", "prefill chunked gqa +pad"])
def test_paged_attention_default_launch(case: str) -> None:
    c = selfcheck.paged_cases(True, torch.float32, DEVICE)[case]
    _assert_ok(selfcheck.check_paged(c, case))  # block sizes and split count as on the GPU path


def test_paged_attention_public_op_strided_q() -> None:
    c = selfcheck.make_paged_case([4, 1, 9], [4, 30, 9], 8, 2, 32, pad_tokens=2, seed=7, device=DEVICE)
    tokens = c.q.shape[0]
    # q as a slice of a fused qkv projection: token stride 3 * Hq * D, not contiguous.
    qkv = torch.randn(tokens, 3 * 8 * 32, device=DEVICE)
    q = qkv[:, : 8 * 32].view(tokens, 8, 32)
    meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)
    out = paged_attention.paged_attention(q, c.k, c.v, c.k_cache, c.v_cache, *meta)
    ref = paged_attention_reference(q.contiguous(), c.k, c.v, c.k_cache_ref, c.v_cache_ref, *meta)
    n = c.num_real
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert selfcheck.rel_err(out[:n], ref[:n]) <= 1e-5
    assert bool((out[n:] == 0).all())


@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan")])
def test_paged_attention_rejects_a_scale_that_is_not_positive(scale: float) -> None:
    """The key loops scale each row's max rather than every score, which holds only for a positive scale."""
    c = selfcheck.make_paged_case([3, 1], [3, 9], 8, 2, 32, seed=3, device=DEVICE)
    meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, scale)
    with pytest.raises(ValueError, match="scale must be > 0"):
        paged_attention.paged_attention(c.q, c.k, c.v, c.k_cache, c.v_cache, *meta)


def test_public_elementwise_ops_match_reference() -> None:
    gen = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(DEVICE)

    x, w = randn(2, 3, 64), randn(64)
    assert selfcheck.rel_err(norms.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)) <= 1e-5
    res = randn(2, 3, 64)
    normed, summed = norms.fused_add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(summed, x + res)
    assert selfcheck.rel_err(normed, rms_norm_reference(x + res, w, 1e-5)) <= 1e-5
    q, k = randn(2, 4, 5, 16), randn(2, 2, 5, 16)
    for cos in (randn(1, 1, 5, 16), randn(5, 16)):
        sin = randn(*cos.shape)
        out, ref = rotary.rotary_embedding(q, k, cos, sin), rotary_embedding_reference(q, k, cos, sin)
        assert max(selfcheck.rel_err(o, r) for o, r in zip(out, ref)) <= 1e-5
    merged = randn(2, 3, 2 * 48)
    gate, up = merged[..., :48], merged[..., 48:]  # 3-D strided slices: rows collapse by a view
    silu = activations.silu_and_mul(gate, up)
    assert selfcheck.rel_err(silu, torch.nn.functional.silu(gate) * up) <= 1e-5
    gelu = activations.gelu_and_mul(gate, up, "tanh")
    assert selfcheck.rel_err(gelu, torch.nn.functional.gelu(gate, approximate="tanh") * up) <= 1e-5


def test_outputs_have_the_strides_the_fakes_declare() -> None:
    """Inductor asserts a bound kernel's output strides against the op's fake (an H100 run failed so)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def strides(out: torch.Tensor | tuple[torch.Tensor, ...]) -> list[tuple[int, ...]]:
        return [t.stride() for t in (out if isinstance(out, tuple) else (out,))]

    x = torch.randn(3, 5, 64, device=DEVICE).transpose(0, 1)  # permuted, dense
    w = torch.randn(64, device=DEVICE)
    q = torch.randn(2, 5, 4, 16, device=DEVICE).transpose(1, 2)  # HF's [B, H, T, D] view of [B, T, H, D]
    k = torch.randn(2, 5, 2, 16, device=DEVICE).transpose(1, 2)
    cos, sin = torch.randn(2, 1, 5, 16, device=DEVICE), torch.randn(2, 1, 5, 16, device=DEVICE)
    merged = torch.randn(3, 2 * 48, device=DEVICE)
    cases = {
        "rms_norm": (norms.rms_norm, (x, w, 1e-5)),
        "fused_add_rms_norm": (norms.fused_add_rms_norm, (x, x.clone(), w, 1e-5)),
        "rotary_embedding": (rotary.rotary_embedding, (q, k, cos, sin)),
        "silu_and_mul": (activations.silu_and_mul, (merged[:, :48], merged[:, 48:])),
    }
    for name, (kernel, args) in cases.items():
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            declared = strides(getattr(torch.ops.fxllm, name)(*fake_args))
        assert strides(kernel(*args)) == declared, name


def test_unsupported_shapes_fall_back_to_reference() -> None:
    x, w = torch.randn(4, 32, device=DEVICE), torch.randn(32, device=DEVICE)
    residual = torch.randn(32, device=DEVICE)  # broadcast residual: reference path
    normed, summed = norms.fused_add_rms_norm(x, residual, w, 1e-6)
    assert torch.allclose(normed, rms_norm_reference(summed, w, 1e-6))
    q3, k3, cos = (torch.randn(*s, device=DEVICE) for s in ((4, 5, 16), (2, 5, 16), (5, 16)))
    out = rotary.rotary_embedding(q3, k3, cos, cos)  # 3-D q: reference path
    assert torch.allclose(out[0], rotary_embedding_reference(q3, k3, cos, cos)[0])


def test_check_all_small() -> None:
    results = selfcheck.check_all(DEVICE, torch.float32, small=True)
    assert len(results) >= 13 and all(r["ok"] for r in results), [r for r in results if not r["ok"]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("rows", "n", "k", "bias"), [(1, 40, 96, True), (3, 32, 64, False), (16, 48, 128, True)]
)
def test_gemv(dtype: torch.dtype, rows: int, n: int, k: int, bias: bool) -> None:
    # Small tiles so that several K steps, an uneven last N block and (k=96) a partial K tile all run.
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
    gemv.gemv_out(x, w, b, out, block_n=16, block_k=32)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    # float32 accumulation of bf16/fp16 products, one rounding of the output: ~2e-3 relative (bf16).
    assert selfcheck.rel_err(out.float(), ref) <= 1e-2


def test_gemv_runs_only_where_named() -> None:
    assert "triton" in op_backends("linear")
    cuda = OpSite("linear", torch.device("cuda"))
    assert choose_implementation(cuda).backend != "triton"  # cuBLAS measured as fast at M = 1
    assert choose_implementation(cuda, "triton").backend == "triton"


def test_gemv_linear_routes_by_rows_and_shape() -> None:
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, device=DEVICE)  # 10 rows: the GEMV
    w = torch.randn(24, 64, dtype=torch.bfloat16, device=DEVICE)
    ref = torch.nn.functional.linear(x.float(), w.float())
    out = gemv.linear(x, w)
    assert out.shape == (2, 5, 24) and selfcheck.rel_err(out.float(), ref) <= 1e-2
    assert gemv.supported(x, w)
    assert not gemv.supported(x[..., :63], w[:, :63])  # rows of 63 bf16 values: not 16-byte aligned
    big = torch.randn(
        gemv.GEMV_MAX_M + 1, 64, dtype=torch.bfloat16, device=DEVICE
    )  # F.linear above the limit
    torch.testing.assert_close(gemv.linear(big, w), torch.nn.functional.linear(big, w))


@pytest.mark.parametrize(
    ("block_size", "block_n", "window", "page_rows"),
    [
        (8, 32, -1, 8),  # tiles of 4 whole pages: one block-table entry per page
        (16, 16, -1, 16),  # one page per tile
        (12, 32, -1, 0),  # block size not a power of two: one entry per key
        (32, 16, -1, 0),  # a tile inside a page
        (8, 32, 21, 0),  # a sliding window starts mid-page
    ],
)
@pytest.mark.parametrize("swap_ab", [True, False])
def test_decode_whole_page_tiles(
    block_size: int, block_n: int, window: int, page_rows: int, swap_ab: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode kernel looks up one block-table entry per page where its key tiles are whole pages, and one
    per key elsewhere; both agree with the reference (contexts end mid-page, several tiles, two splits)."""
    launched = record_launches(monkeypatch, paged_attention, "_decode_kernel")
    c = selfcheck.make_paged_case([1, 1, 1], [5, 77, 130], 8, 2, 32, block_size=block_size, sliding_window=window,
                                  pad_tokens=1, pad_seqs=1, seed=11, device=DEVICE)  # fmt: skip
    _assert_ok(selfcheck.check_paged(c, "decode", block_n=block_n, num_splits=2, swap_ab=swap_ab))
    assert [kw["PAGE_ROWS"] for kw in launched] == [page_rows]


@pytest.mark.parametrize(
    ("block_size", "block_n", "window", "page_tiles", "page_rows"),
    [
        (8, 32, -1, True, 8),  # tiles of 4 whole pages
        (16, 16, -1, True, 16),  # one page per tile
        (12, 32, -1, True, 0),  # block size not a power of two: one entry per key
        (32, 16, -1, True, 0),  # a tile inside a page
        (8, 32, 21, True, 0),  # a sliding window starts mid-page
        (8, 32, -1, False, 0),  # asked for one entry per key
    ],
)
def test_prefill_whole_page_tiles(
    block_size: int,
    block_n: int,
    window: int,
    page_tiles: bool,
    page_rows: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `page_tiles` the prefill kernel's key tiles are whole pages where the cache allows; either way it
    agrees with the reference: chunked prompts whose unmasked tiles (below the diagonal) and diagonal tiles
    both cross pages, beside a decode row, contexts ending mid-page."""
    launched = record_launches(monkeypatch, paged_attention, "_prefill_kernel")
    c = selfcheck.make_paged_case([6, 40, 1], [6, 83, 130], 8, 2, 32, block_size=block_size, sliding_window=window,
                                  pad_tokens=2, seed=13, device=DEVICE)  # fmt: skip
    _assert_ok(selfcheck.check_paged(c, "prefill", block_m=16, block_n=block_n, page_tiles=page_tiles))
    assert [kw["PAGE_ROWS"] for kw in launched] == [page_rows]


def test_prefill_gpu_default_launch() -> None:
    """The GPU's default prefill launch for head dims <= 128 (128 query rows x 64 keys, 4 warps) agrees with the
    reference: query blocks that end mid-block (the store rebuilds its rows from scalars and must mask them),
    whole unmasked tiles (page entries loaded per key) and diagonal tiles, GQA groups packed as rows, contexts
    ending mid-page. tests/test_fp8_kv_triton.py runs the same launch over an FP8 cache."""
    launch = prefill_launch(32, on_gpu=True)
    # The launch these cases were chosen for: a new default wants them reread.
    assert launch == (128, 64, 4, 3)
    c = selfcheck.make_paged_case([70, 1, 200], [90, 33, 260], 8, 2, 32, block_size=16, pad_tokens=3, seed=5,
                                  device=DEVICE)  # fmt: skip
    _assert_ok(selfcheck.check_paged(c, "prefill", **launch._asdict()))
