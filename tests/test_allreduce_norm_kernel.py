"""The one-kernel all-reduce + add + RMSNorm (fxllm/backends/triton/allreduce_norm.py) without a GPU.

Its numerics and speed are checked on GPUs by `benchmarks/gpu_tp.py` (section allreduce: against the
unfused path). Here: it compiles for Hopper (ptxas from the triton wheel, no device needed), its barrier
is the two release/acquire flag exchanges per row on peer memory only (no multicast instruction), and
shapes outside the decode regime go to the unfused path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from fxllm.backends.triton import allreduce_norm  # noqa: E402

_PTX_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxllm.backends.triton import allreduce_norm

signature = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16",
             "sum_ptr": "*bf16", "buffer_ptrs": "i64", "signal_pads": "i64", "rank": "i32", "n_cols": "i32",
             "eps": "fp32", "WORLD": "constexpr", "BLOCK_N": "constexpr"}
source = ASTSource(fn=allreduce_norm._allreduce_add_rms_norm_kernel, signature=signature,
                   constexprs={"WORLD": int(sys.argv[1]), "BLOCK_N": int(sys.argv[2])})
try:
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
except RuntimeError as exc:
    print("SKIP", exc)
else:
    print(compiled.asm["ptx"])
"""


def _ptx(world: int, block_n: int) -> str:
    # In a process of its own: test modules collected before this one may have set TRITON_INTERPRET=1 and
    # re-imported the kernels as interpreted functions, which the compiler cannot take.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    ptx = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, str(world), str(block_n)], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout  # fmt: skip
    if ptx.startswith("SKIP"):  # e.g. no ptxas in this triton build
        pytest.skip(f"cannot compile for sm_90 here: {ptx}")
    return ptx


@pytest.mark.parametrize("world", [2, 4])
def test_compiles_for_hopper_with_two_flag_exchanges_per_row(world: int) -> None:
    ptx = _ptx(world, 4096)
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
