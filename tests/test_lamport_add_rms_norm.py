"""All-reduce + add + RMSNorm in one Lamport launch (fxllm/backends/triton/lamport_add_rms_norm.py), without a GPU.

Two ranks simulated in one process under Triton's interpreter, as in tests/test_lamport_all_reduce.py: rank 1's
rows "already sent" are copied into rank 0's buffer, then rank 0's kernel runs whole. Checked: both outputs equal
the unfused path bit for bit (the fp32 rank-order sum, then the Triton add + RMSNorm), the kernel shares the plain
all-reduce's buffer and slot state (calls of the two interleave), -0.0 rows, and the PTX for Hopper (fence before
the sends, the timeout trap, no multicast). Timings and the cross-GPU run: benchmarks/gpu_lamport_norm.py.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fxllm.backends.triton as tb  # noqa: E402
from fxllm.backends import cuda_lamport  # noqa: E402, F401  (registers the backend read below)
from fxllm.backends.registry import implementation  # noqa: E402
from fxllm.backends.triton import lamport_add_rms_norm as fused  # noqa: E402
from fxllm.backends.triton import lamport_all_reduce as lamport  # noqa: E402
from fxllm.backends.triton import norms  # noqa: E402

if DEVICE == "cpu":
    tb.patch_interpreter()
    # Modules imported as GPU kernels before TRITON_INTERPRET=1 was set: re-import them, the fused kernel's
    # module last (it binds the epilogue and the fence helpers of the others by name).
    kernels = (
        fused._lamport_add_rms_norm_kernel,
        norms.add_rms_norm_epilogue,
        lamport._lamport_all_reduce_kernel,
    )
    if not all(isinstance(k, InterpretedFunction) for k in kernels):
        lamport, norms, fused = (importlib.reload(m) for m in (lamport, norms, fused))

WORLD, SEG, EPS, TIMEOUT_NS = 2, 4096, 1e-5, 10**10
BF16 = torch.bfloat16


class TwoRanks:
    """Two ranks' buffers, pointer tables and slot states in one process."""

    def __init__(self) -> None:
        self.buffers = [
            torch.full((3 * WORLD * SEG,), -(2**15), dtype=torch.int16, device=DEVICE) for _ in range(2)
        ]
        self.ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64, device=DEVICE)
        self.states = [lamport.new_state(torch.device(DEVICE)) for _ in range(WORLD)]

    def presend(self, x: torch.Tensor) -> None:
        """Rank 1's part of rank 0's next call, as if rank 1 ran ahead (-0.0 sent as +0.0)."""
        start = (int(self.states[1][0]) * WORLD + 1) * SEG
        bits = x.reshape(-1).view(torch.int16)
        self.buffers[0][start : start + bits.numel()] = torch.where(
            bits == -(2**15), torch.zeros_like(bits), bits
        )

    def fused(
        self, rank: int, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, *, split: bool = False
    ) -> tuple:
        out, summed = torch.empty_like(x), torch.empty_like(x)
        block = 1 << (x.shape[-1] - 1).bit_length()
        # split: the host wrapper's grid, several programs per row (each stores only its columns)
        parts, part = fused.split_row(x.shape[0], x.shape[-1], x.element_size()) if split else (1, 0)
        fused._lamport_add_rms_norm_kernel[(x.shape[0], parts)](
            x, residual, weight, out, summed, self.ptrs, self.states[rank], rank, x.shape[-1], SEG, EPS,
            TIMEOUT_NS, WORLD=WORLD, BLOCK_N=block, SENTINEL=-(2**15), USE_ASM=False, PART=part,
        )  # fmt: skip
        return out, summed

    def plain(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        lamport.lamport_all_reduce(x, out, self.ptrs, self.states[rank], rank, WORLD, SEG, TIMEOUT_NS)
        return out

    def slot_is_clear(self, owner: int, slot: int) -> bool:
        chunk = self.buffers[owner][slot * WORLD * SEG : (slot + 1) * WORLD * SEG]
        return bool((chunk == -(2**15)).all())


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
    out, summed = ranks.fused(0, xs[0], residual, weight, split=split)
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
            out = ranks.plain(0, flat[0])
            assert torch.equal(out, (flat[0].float() + flat[1].float()).to(BF16)), f"call {call}"
        else:
            out, summed = ranks.fused(0, xs[0], residual, weight, split=call % 2 == 0)
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


_PTX_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxllm.backends.triton import lamport_add_rms_norm as fused

signature = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16",
             "sum_ptr": "*bf16", "peer_ptrs": "*i64", "state_ptr": "*i32", "rank": "i32", "n_cols": "i32",
             "seg_elems": "i32", "eps": "fp32", "timeout_ns": "i64", "WORLD": "constexpr",
             "BLOCK_N": "constexpr", "SENTINEL": "constexpr", "USE_ASM": "constexpr", "PART": "constexpr"}
for part in (0, 1024):  # one program per row; the row's columns sent by several programs
    source = ASTSource(fn=fused._lamport_add_rms_norm_kernel, signature=signature,
                       constexprs={"WORLD": 2, "BLOCK_N": 4096, "SENTINEL": -(2**15), "USE_ASM": True, "PART": part})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except RuntimeError as exc:
        print("SKIP", exc)
        break
    print(compiled.asm["ptx"])
    print("=== END OF PTX ===")
"""


def test_ptx_for_hopper_fences_before_sending_and_traps_on_timeout() -> None:
    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
    }  # the compiler, not the interpreter
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    ptx = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout  # fmt: skip
    if ptx.startswith("SKIP"):
        pytest.skip(f"cannot compile for sm_90 here: {ptx}")
    variants = ptx.split("=== END OF PTX ===")[:-1]
    assert len(variants) == 2
    for variant in variants:
        fence = variant.index("fence.acq_rel.sys")
        first_volatile = variant.index("ld.volatile.global")
        assert fence < first_volatile and "trap;" in variant and "%globaltimer" in variant
        assert "multimem" not in variant
