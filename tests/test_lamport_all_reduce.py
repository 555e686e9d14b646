"""The Lamport all-reduce kernel (fxllm/backends/triton/lamport_all_reduce.py) and its backend's host logic.

On a CPU-only machine the kernel runs in Triton's interpreter with two ranks simulated in one process
(tests/two_rank.py): two buffers, each rank's kernel given both addresses. A call of rank 1 "that already ran its send" is a
copy of its input's bits into segment 1 of rank 0's buffer; rank 0's kernel then runs whole (its clear,
its sends into both buffers, its wait, its sum), then rank 1's. The real timings, the fence and the
cross-GPU behaviour are checked on GPUs by benchmarks/gpu_allreduce.py; here the PTX for Hopper is
checked (tests/hopper_ptx.py) to hold the fence before the first store, the timeout trap and no multicast
instruction.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from two_rank import DEVICE, SEG, WORLD, TwoRanks, interpret_on_cpu, interpreted

interpret_on_cpu()
pytest.importorskip("triton", reason="triton is not installed")

import hopper_ptx  # noqa: E402

from fxllm.backends import cuda_lamport  # noqa: E402
from fxllm.backends.registry import implementation, op_backends  # noqa: E402
from fxllm.backends.triton import lamport_all_reduce as lamport  # noqa: E402
from fxllm.config import load_config  # noqa: E402

(lamport,) = interpreted([lamport], [lamport._lamport_all_reduce_kernel])

hopper_ptx.register(
    "lamport_all_reduce", "fxllm.backends.triton.lamport_all_reduce", "_lamport_all_reduce_kernel",
    {"x_ptr": "*bf16", "out_ptr": "*bf16", "peer_ptrs": "*i64", "state_ptr": "*i32", "rank": "i32", "n": "i32",
     "seg_elems": "i32", "timeout_ns": "i64", "WORLD": "constexpr", "BLOCK": "constexpr", "SENTINEL": "constexpr",
     "USE_ASM": "constexpr"},
    {"WORLD": 4, "BLOCK": 1024, "SENTINEL": -(2**15), "USE_ASM": True},
    divisible=(0, 1, 2, 3, 5, 6),
)  # fmt: skip


def reference(xs: list[torch.Tensor]) -> torch.Tensor:
    """The fp32 sum in rank order, rounded once to the inputs' dtype."""
    total = torch.zeros_like(xs[0], dtype=torch.float32)
    for x in xs:
        total += x.float()
    return total.to(xs[0].dtype)


def test_one_call_sums_sends_clears_and_advances() -> None:
    ranks = TwoRanks(torch.bfloat16)
    n = 2500  # 3 programs of 1024, the last one partial
    # Dirt in slot 1 (as a call two calls back would have left it, 3000 elements per segment): cleared now.
    ranks.states[0][3] = 3000
    ranks.buffers[0][WORLD * SEG : WORLD * SEG + 3000] = 7
    ranks.buffers[0][WORLD * SEG + SEG : WORLD * SEG + SEG + 3000] = 7
    xs = [torch.randn(n, device=DEVICE).to(torch.bfloat16) for _ in range(WORLD)]
    ranks.segment(0, 0, 1, n).copy_(xs[1].view(torch.int16))
    out = ranks.run(0, xs[0])
    assert torch.equal(out, reference(xs))
    assert torch.equal(ranks.segment(1, 0, 0, n), xs[0].view(torch.int16))  # sent into the peer's slot 0
    assert torch.equal(ranks.segment(0, 0, 0, n), xs[0].view(torch.int16))  # and into its own
    assert ranks.slot_is_clear(0, 1)
    # Slot 1 next, arrivals reset, slot 0 holds n (slot 1's size is rewritten by the call that uses it).
    assert ranks.states[0].tolist() == [1, 0, n, 3000, 0]


def test_calls_rotate_slots_with_changing_sizes_and_ranks_agree() -> None:
    ranks = TwoRanks(torch.bfloat16)
    for call, n in enumerate([2500, 700, 4096, 100, 3000, 17, 4096]):
        xs = [torch.randn(n, device=DEVICE).to(torch.bfloat16) * (r + 1) for r in range(WORLD)]
        outs = ranks.call(xs)
        assert torch.equal(outs[0], reference(xs)), f"call {call}, {n} elements"
        assert torch.equal(
            outs[0].view(torch.int16), outs[1].view(torch.int16)
        )  # bit-identical on both ranks
        next_slot = (call + 1) % 3
        for rank in range(WORLD):
            assert int(ranks.states[rank][0]) == next_slot and int(ranks.states[rank][1]) == 0
            # The slot the next call uses is the sentinel everywhere, whatever sizes came before.
            assert ranks.slot_is_clear(rank, next_slot), f"call {call}: rank {rank}'s slot {next_slot} dirty"


def test_negative_zero_is_sent_as_positive_zero() -> None:
    ranks = TwoRanks(torch.bfloat16)
    n = 1100
    xs = [torch.randn(n, device=DEVICE).to(torch.bfloat16) for _ in range(WORLD)]
    xs[0][::3] = -0.0
    xs[1][::5] = -0.0
    outs = ranks.call(xs)
    # Had a -0.0 been sent as is, the receiver would wait for it forever (it is the sentinel).
    assert not bool((ranks.segment(1, 0, 0, n) == lamport.SENTINELS[torch.bfloat16]).any())
    assert torch.equal(outs[0], reference(xs)) and torch.equal(outs[1], outs[0])


def test_float32() -> None:
    ranks = TwoRanks(torch.float32, seg=2048)
    for n in (2048, 333, 1500):
        xs = [torch.randn(n, device=DEVICE) for _ in range(WORLD)]
        xs[1][:7] = -0.0
        outs = ranks.call(xs)
        assert torch.equal(outs[0], xs[0] + xs[1]) and torch.equal(outs[1], outs[0])


@pytest.mark.skipif(DEVICE != "cpu", reason="a host thread plays the late peer in the interpreter")
def test_waits_for_a_late_peer() -> None:
    ranks = TwoRanks(torch.bfloat16)
    n = 3000
    xs = [torch.randn(n).to(torch.bfloat16) for _ in range(WORLD)]

    def late_send() -> None:
        time.sleep(0.3)
        ranks.segment(0, 0, 1, n).copy_(xs[1].view(torch.int16))

    sender = threading.Thread(target=late_send)
    start = time.perf_counter()
    sender.start()
    out = ranks.run(0, xs[0])  # spins until the thread's data is there
    sender.join()
    assert time.perf_counter() - start >= 0.3
    assert torch.equal(out, reference(xs))


def test_block_and_grid() -> None:
    assert lamport.block_for(4096, torch.bfloat16) == 1024  # 8 KB: 4 programs of 2 KB
    assert lamport.block_for(128 * 1024, torch.bfloat16) == 1024  # 256 KiB: 128 programs
    assert lamport.block_for(512 * 1024, torch.bfloat16) == 4096  # 1 MiB: still 128 programs
    assert lamport.block_for(100, torch.float32) == 512


def test_routing_and_buffer_layout() -> None:
    limit = 256 * 1024
    assert cuda_lamport.route(8192, torch.bfloat16, limit) == "lamport"
    assert cuda_lamport.route(limit, torch.bfloat16, limit) == "lamport"
    assert cuda_lamport.route(limit + 2, torch.bfloat16, limit) == "fallback"
    assert cuda_lamport.route(8192, torch.bfloat16, 0) == "fallback"  # 0 disables
    assert cuda_lamport.route(8192, torch.int32, limit) == "fallback"
    assert cuda_lamport.route(8192, torch.bfloat16, limit, capturing=False) == "fallback"  # eager: symm_mem
    assert cuda_lamport.segment_elems(limit, torch.bfloat16) == 128 * 1024
    assert cuda_lamport.segment_elems(1000, torch.float32) == 256  # 250 rounded up to 16
    cuda_lamport.configure_group("test-group", 4096, 5.0)
    assert cuda_lamport.limits("test-group") == cuda_lamport.LamportLimits(4096, 5.0)
    assert cuda_lamport.limits("never-configured").max_bytes == 256 * 1024
    with pytest.raises(ValueError, match="lamport_max_bytes"):
        cuda_lamport.configure_group("test-group", -1, 5.0)


def test_config_key_and_backend_registration() -> None:
    assert load_config().parallel.lamport_max_bytes == 256 * 1024
    assert load_config(overrides=["parallel.lamport_max_bytes=0"]).parallel.lamport_max_bytes == 0
    with pytest.raises(ValueError, match="lamport_max_bytes"):
        load_config(overrides=["parallel.lamport_max_bytes=-1"])
    with pytest.raises(ValueError, match="lamport_max_byte"):
        load_config(overrides=["parallel.lamport_max_byte=1"])  # unknown key, named
    # The override the GPU benchmarks pass to choose the backend parses as a mapping.
    config = load_config(overrides=["compile.op_backends={all_reduce: triton_lamport}"])
    assert config.compile.op_backends == {"all_reduce": "triton_lamport"}
    assert "triton_lamport" in op_backends("all_reduce")
    # Above symm_mem (measured faster on 2 x H100); eager calls take symm_mem inside the backend.
    from fxllm.backends import cuda_collectives  # registers symm_mem (imported on CUDA machines)

    assert cuda_lamport.PRIORITY > cuda_collectives.PRIORITY
    assert implementation("all_reduce", "triton_lamport").priority == cuda_lamport.PRIORITY


def test_ptx_for_hopper_fences_before_sending_and_traps_on_timeout() -> None:
    ptx = hopper_ptx.ptx("lamport_all_reduce")
    fence = ptx.index("fence.acq_rel.sys")
    stores = [i for i in range(len(ptx)) if ptx.startswith("st.global.v4", i)]
    assert len(stores) == 4 + 4 + 1  # clear of 4 segments, send to 4 ranks, the output: 16-byte vectors
    assert sum(i < fence for i in stores) == 4  # the clears before the fence, the sends after it
    assert "trap;" in ptx and "%globaltimer" in ptx
    assert "ld.volatile.global.v4" in ptx
    assert "multimem" not in ptx
