"""The peer-memory all-gather's layout and buffer bookkeeping, on the CPU with stand-in peers.

The CUDA kernels (copies and signal-pad barriers) need 2+ GPUs and run in benchmarks/gpu_tp.py; here
each "peer" is a tensor in this process, so what is checked is what the backend itself decides: which
part lands where (rank-major along the last dimension, as `fxllm::all_gather`'s reference), that both
barriers run in order around the reads, that the buffer grows outside a capture and keeps the old one
alive for captured graphs, and that an oversized part takes the logged NCCL path.
"""

from __future__ import annotations

import pytest
import torch

from fxllm.backends import cuda_all_gather


class FakeHandle:
    """A rendezvous handle whose peers are buffers in this process; records barrier calls."""

    def __init__(self, buffers: list[torch.Tensor], calls: list[str]) -> None:
        self.buffers, self.calls, self.world_size = buffers, calls, len(buffers)

    def barrier(self, channel: int = 0) -> None:
        self.calls.append(f"barrier{channel}")

    def get_buffer(self, rank: int, sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.calls.append(f"read{rank}")
        n = int(torch.Size(sizes).numel()) * dtype.itemsize
        return self.buffers[rank][:n].view(dtype).view(sizes)


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_all_gather, "_STATE", {})
    monkeypatch.setattr(cuda_all_gather, "COUNTS", cuda_all_gather.GatherCounts())


@pytest.mark.parametrize("world", [2, 4])
def test_parts_land_rank_major_like_the_reference(
    world: int, fresh_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, n, rank = 3, 5, 1
    parts = [torch.randn(1, rows, n) for _ in range(world)]
    peers = [torch.empty(4096, dtype=torch.uint8) for _ in range(world)]
    for r in range(world):  # the peers' buffers already hold their parts (they ran their copy too)
        peers[r][: rows * n * 4].view(torch.float32).copy_(parts[r].reshape(-1))
    calls: list[str] = []
    handle = FakeHandle(peers, calls)
    monkeypatch.setattr(cuda_all_gather, "_buffer", lambda group, device, nbytes: (peers[rank], handle))
    out = cuda_all_gather.all_gather(parts[rank], "0", world)
    expected = torch.cat(parts, dim=-1)  # what all_gather_reference returns: [.., world * n], rank order
    assert out.shape == (1, rows, world * n)
    assert torch.equal(out, expected)
    assert calls == ["barrier0", *[f"read{r}" for r in range(world)], "barrier1"]
    assert cuda_all_gather.COUNTS.peer == 1


def test_buffer_grows_by_doubling_and_keeps_the_old_one(
    fresh_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[int] = []

    def fake_symmetric_buffer(group, numel, dtype, device, what):
        made.append(numel)
        return torch.empty(numel, dtype=dtype), object()

    monkeypatch.setattr("fxllm.backends.cuda_collectives.symmetric_buffer", fake_symmetric_buffer)
    device = torch.device("cpu")
    first, _ = cuda_all_gather._buffer("0", device, 1000)
    assert first.numel() == cuda_all_gather._MIN_BYTES
    same, _ = cuda_all_gather._buffer("0", device, cuda_all_gather._MIN_BYTES)
    assert same is first and len(made) == 1  # fits: no new rendezvous
    bigger, _ = cuda_all_gather._buffer("0", device, 3 * cuda_all_gather._MIN_BYTES)
    assert bigger.numel() == 4 * cuda_all_gather._MIN_BYTES
    state = cuda_all_gather._STATE[("0", device)]
    assert state.keep == [first]  # a graph captured on the first buffer still reads valid memory


def test_oversized_part_takes_nccl_and_is_counted(fresh_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_all_gather, "MAX_BYTES", 64)
    sent: list[tuple[int, ...]] = []

    def fake_reference(x, group_name, group_size):
        sent.append(tuple(x.shape))
        return torch.cat([x] * group_size, dim=-1)

    fake_reference.__wrapped__ = fake_reference  # type: ignore[attr-defined]
    monkeypatch.setattr("fxllm.ops.collectives.all_gather_reference", fake_reference)
    x = torch.randn(4, 8)  # 128 bytes > 64
    out = cuda_all_gather.all_gather(x, "0", 2)
    assert sent == [(4, 8)] and out.shape == (4, 16)
    assert cuda_all_gather.COUNTS.nccl == 1 and cuda_all_gather.COUNTS.peer == 0


def test_supports_only_cuda_groups_of_known_sizes() -> None:
    from fxllm.backends.registry import OpSite

    x = torch.empty(1, 8)
    assert not cuda_all_gather.supports(OpSite("all_gather", torch.device("cpu"), (x, "0", 2)))
