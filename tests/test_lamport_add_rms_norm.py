"""All-reduce + add + RMSNorm in one Lamport launch (fxllm/backends/triton/lamport_add_rms_norm.py), without a GPU.

Two ranks simulated in one process under Triton's interpreter (tests/two_rank.py), as for the plain all-reduce: rank 1's
rows "already sent" are copied into rank 0's buffer, then rank 0's kernel runs whole. Checked: both outputs equal
the unfused path bit for bit (the fp32 rank-order sum, then the Triton add + RMSNorm), the kernel shares the plain
all-reduce's buffer and slot state (calls of the two interleave), -0.0 rows, and the PTX for Hopper (fence before
the sends, the timeout trap, no multicast). Timings and the cross-GPU run: benchmarks/gpu_lamport_norm.py.
"""

from __future__ import annotations

import pytest
import torch
from two_rank import DEVICE, SEG, TIMEOUT_NS, WORLD, TwoRanks, interpret_on_cpu, interpreted

interpret_on_cpu()
pytest.importorskip("triton", reason="triton is not installed")

import hopper_ptx  # noqa: E402

from fxllm.backends import cuda_lamport  # noqa: E402, F401  (registers the backend read below)
from fxllm.backends.registry import implementation  # noqa: E402
from fxllm.backends.triton import lamport_add_rms_norm as fused  # noqa: E402
from fxllm.backends.triton import lamport_all_reduce as lamport  # noqa: E402
from fxllm.backends.triton import norms  # noqa: E402

# Modules imported as GPU kernels before TRITON_INTERPRET=1 was set are re-imported, the fused kernel's module
# last (it binds the epilogue and the fence helpers of the others by name).
lamport, norms, fused = interpreted(
    [lamport, norms, fused],
    [fused._lamport_add_rms_norm_kernel, norms.add_rms_norm_epilogue, lamport._lamport_all_reduce_kernel],
)

EPS = 1e-5
BF16 = torch.bfloat16

_SIGNATURE = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16",
              "sum_ptr": "*bf16", "peer_ptrs": "*i64", "state_ptr": "*i32", "rank": "i32", "n_cols": "i32",
              "seg_elems": "i32", "eps": "fp32", "timeout_ns": "i64", "WORLD": "constexpr",
              "BLOCK_N": "constexpr", "SENTINEL": "constexpr", "USE_ASM": "constexpr", "PART": "constexpr"}  # fmt: skip
PTX_PARTS = (0, 1024)  # one program per row; the row's columns sent by several programs
for _part in PTX_PARTS:
    hopper_ptx.register(
        f"lamport_add_rms_norm_part{_part}", "fxllm.backends.triton.lamport_add_rms_norm",
        "_lamport_add_rms_norm_kernel", _SIGNATURE,
        {"WORLD": 2, "BLOCK_N": 4096, "SENTINEL": -(2**15), "USE_ASM": True, "PART": _part},
    )  # fmt: skip


def _fused(
    ranks: TwoRanks,
    rank: int,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    *,
    split: bool = False,
) -> tuple:
    """Rank `rank`'s fused all-reduce + add + RMSNorm of `x` over the two ranks' buffers: (out, summed)."""
    out, summed = torch.empty_like(x), torch.empty_like(x)
    block = 1 << (x.shape[-1] - 1).bit_length()
    # split: the host wrapper's grid, several programs per row (each stores only its columns)
    parts, part = fused.split_row(x.shape[0], x.shape[-1], x.element_size()) if split else (1, 0)
    fused._lamport_add_rms_norm_kernel[(x.shape[0], parts)](
        x, residual, weight, out, summed, ranks.ptrs, ranks.states[rank], rank, x.shape[-1], SEG, EPS,
        TIMEOUT_NS, WORLD=WORLD, BLOCK_N=block, SENTINEL=-(2**15), USE_ASM=False, PART=part,
    )  # fmt: skip
    return out, summed


def _unfused(xs: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor) -> tuple:
    reduced = (xs[0].float() + xs[1].float()).to(BF16)  # the all-reduce: fp32 sum in rank order, one rounding
    return norms.fused_add_rms_norm(reduced, residual, weight, EPS)


def _inputs(rows: int, cols: int, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(rows, cols, generator=gen) * (r + 1)).to(BF16).to(DEVICE) for r in range(WORLD)]
    residual = torch.randn(rows, cols, generator=gen).to(BF16).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(cols, generator=gen)).to(BF16).to(DEVICE)
    return xs, residual, weight


@pytest.mark.parametrize(("rows", "cols", "split"), [(1, 4096, False), (3, 96, False), (5, 640, False),
                                                    (1, 4096, True), (2, 2048, True)])  # fmt: skip
def test_equals_the_unfused_path_bit_for_bit(rows: int, cols: int, split: bool) -> None:
    if split:  # several programs per row, so each one's store mask is tested
        assert fused.split_row(rows, cols, 2)[0] > 1
    ranks = TwoRanks()
    xs, residual, weight = _inputs(rows, cols, rows)
    xs[1][0, ::7] = -0.0  # never the sentinel on the wire
    ranks.presend(xs[1])
    out, summed = _fused(ranks, 0, xs[0], residual, weight, split=split)
    expected_out, expected_sum = _unfused(xs, residual, weight)
    assert torch.equal(summed, expected_sum) and torch.equal(out, expected_out)
    assert ranks.states[0].tolist()[:3] == [1, 0, rows * cols] and ranks.slot_is_clear(0, 1)


def test_shares_slots_with_the_plain_all_reduce() -> None:
    ranks = TwoRanks()
    for call, kind in enumerate(["plain", "fused", "fused", "plain", "fused", "plain", "plain", "fused"]):
        xs, residual, weight = _inputs(2 + call % 3, 256, call)
        ranks.presend(xs[1])
        if kind == "plain":
            flat = [x.reshape(-1) for x in xs]
            out = ranks.run(0, flat[0])
            assert torch.equal(out, (flat[0].float() + flat[1].float()).to(BF16)), f"call {call}"
        else:
            out, summed = _fused(ranks, 0, xs[0], residual, weight, split=call % 2 == 0)
            expected_out, expected_sum = _unfused(xs, residual, weight)
            assert torch.equal(out, expected_out) and torch.equal(summed, expected_sum), f"call {call}"
        assert int(ranks.states[0][0]) == (call + 1) % 3 and ranks.slot_is_clear(0, (call + 1) % 3)
        ranks.states[1][0] = ranks.states[0][0]  # rank 1 made the same call


def test_eligibility_and_registration() -> None:
    x = torch.zeros(4, 4096, dtype=BF16)
    w = torch.ones(4096, dtype=BF16)
    assert fused.eligible(x, x, w, 256 * 1024)
    assert not fused.eligible(
        torch.zeros(33, 4096, dtype=BF16), torch.zeros(33, 4096, dtype=BF16), w, 256 * 1024
    )
    assert not fused.eligible(x.float(), x.float(), w.float(), 256 * 1024)  # float32: unfused
    assert not fused.eligible(x, x, w, 0)  # parallel.lamport_max_bytes=0 turns it off
    assert implementation("all_reduce_add_rms_norm", "triton_lamport").priority == 0  # only where named


def test_ptx_for_hopper_fences_before_sending_and_traps_on_timeout() -> None:
    variants = [hopper_ptx.ptx(f"lamport_add_rms_norm_part{part}") for part in PTX_PARTS]
    for variant in variants:
        fence = variant.index("fence.acq_rel.sys")
        first_volatile = variant.index("ld.volatile.global")
        assert fence < first_volatile and "trap;" in variant and "%globaltimer" in variant
        assert "multimem" not in variant
