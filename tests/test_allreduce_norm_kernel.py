"""The one-kernel all-reduce + add + RMSNorm (fxllm/backends/triton/allreduce_norm.py) without a GPU.

Its numerics and speed are checked on GPUs by `benchmarks/gpu_tp.py` (section allreduce: against the
unfused path). Here: it compiles for Hopper (tests/hopper_ptx.py: ptxas from the triton wheel, no device
needed), its barrier is the two release/acquire flag exchanges per row on peer memory only (no multicast
instruction), and shapes outside the decode regime go to the unfused path.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import hopper_ptx  # noqa: E402

from fxllm.backends.triton import allreduce_norm  # noqa: E402

WORLDS = (2, 4)
for _world in WORLDS:
    hopper_ptx.register(
        f"allreduce_norm_world{_world}", "fxllm.backends.triton.allreduce_norm", "_allreduce_add_rms_norm_kernel",
        {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16", "sum_ptr": "*bf16",
         "buffer_ptrs": "i64", "signal_pads": "i64", "rank": "i32", "n_cols": "i32", "eps": "fp32",
         "WORLD": "constexpr", "BLOCK_N": "constexpr"},
        {"WORLD": _world, "BLOCK_N": 4096},
    )  # fmt: skip


@pytest.mark.parametrize("world", WORLDS)
def test_compiles_for_hopper_with_two_flag_exchanges_per_row(world: int) -> None:
    ptx = hopper_ptx.ptx(f"allreduce_norm_world{world}")
    assert ptx.count("atom.global.release.sys.cas.b32") == 2  # entry and exit barrier: send
    assert ptx.count("atom.global.acquire.sys.cas.b32") == 2  # entry and exit barrier: wait
    assert "multimem" not in ptx  # peer-to-peer only: NVLink multicast stays off
    assert "ld.volatile.global" in ptx  # peers' rows are never read from a stale L1 line


def test_shapes_outside_the_decode_regime_are_not_eligible() -> None:
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    assert allreduce_norm._eligible(x, x, w)
    too_many_rows = torch.zeros(allreduce_norm.MAX_ROWS + 1, 64, dtype=torch.bfloat16)
    assert not allreduce_norm._eligible(too_many_rows, too_many_rows, w)
    assert not allreduce_norm._eligible(x.float(), x.float(), w.float())  # float32: unfused
    assert not allreduce_norm._eligible(x, x[:, :32], w)  # residual of another shape
