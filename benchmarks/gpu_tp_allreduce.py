"""All-reduce timings for gpu_tp.py's section `allreduce`: one spawned process per GPU.

bf16 [tokens, 4096] over every GPU of the machine: NCCL, symmetric-memory one-shot and two-shot, and
fxllm's size-picked backend, eager and inside a CUDA graph, each result checked; then the barrier-free Lamport
all-reduce (backend triton_lamport) the same way; then the one-kernel all-reduce + add + RMSNorm (barrier-based
triton_symm and Lamport) against the unfused path (differences and timings). Rank 0 writes the JSON after
each part, so a part that dies (a Lamport spin that times out traps) leaves the earlier ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("fxllm.gpu.tp")
HIDDEN = 4096
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def _allreduce_rank(rank: int, world: int, port: int, out_file: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from fxllm.backends import cuda_collectives

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device)  # fmt: skip
    group = dist.group.WORLD.group_name
    cuda_collectives.configure_group(group, 256 * 1024, 2048 * HIDDEN * 2)
    numel_max = TOKENS[-1] * HIDDEN
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # older torch needs it before a rendezvous
        enable(group)
    buffer = symm_mem.empty(numel_max, dtype=torch.bfloat16, device=device)
    symm_mem.rendezvous(buffer, group)

    def nccl(x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(x)
        dist.all_reduce(out)

    def one_shot(x: torch.Tensor, out: torch.Tensor) -> None:
        buf = buffer[: x.numel()]
        buf.copy_(x.view(-1))
        if hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
            torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", group, out.view(-1))
        else:
            out.view(-1).copy_(torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group))

    def two_shot(x: torch.Tensor, out: torch.Tensor) -> None:
        buf = buffer[: x.numel()]
        buf.copy_(x.view(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group)
        out.view(-1).copy_(buf)

    def fxllm_auto(x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(cuda_collectives.all_reduce(x, group))

    impls = {"nccl": nccl, "one_shot": one_shot, "two_shot": two_shot, "fxllm": fxllm_auto}
    rows: list[dict[str, Any]] = []
    for tokens in TOKENS:
        x = torch.full((tokens, HIDDEN), float(rank + 1), dtype=torch.bfloat16, device=device)
        out = torch.empty_like(x)
        expected = world * (world + 1) / 2
        row: dict[str, Any] = {"tokens": tokens, "bytes": x.numel() * 2}
        for name, fn in impls.items():
            fn(x, out)
            torch.cuda.synchronize()
            row[f"{name}_ok"] = bool((out == expected).all().item())
            row[f"{name}_eager_us"] = _time_us(lambda fn=fn, x=x, out=out: fn(x, out), graphed=False)
            try:  # the same calls captured in a CUDA graph (buffers exist already), replayed
                row[f"{name}_graph_us"] = _time_us(lambda fn=fn, x=x, out=out: fn(x, out), graphed=True)
            except Exception as exc:  # reported, the other implementations still run
                row[f"{name}_graph_us"] = None
                row[f"{name}_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        if rank == 0:
            logger.info("all-reduce %s", row)
    result: dict[str, Any] = {"world": world, "counts": dict(vars(cuda_collectives.COUNTS)), "rows": rows}
    if rank == 0:
        Path(out_file).write_text(json.dumps(result))  # kept if the parts below fail or hang
    dist.barrier()
    result["lamport"] = _lamport_rows(rank, world, device, group)
    if rank == 0:
        Path(out_file).write_text(json.dumps(result))
    dist.barrier()
    result["fused"] = _fused_allreduce_norm_rows(rank, world, device, group)
    if rank == 0:
        Path(out_file).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _time_us(fn: Any, graphed: bool) -> float:
    """Microseconds per call of `fn()`: 50 eager calls, or 5 replays of a graph of 10 calls."""
    import torch
    import torch.distributed as dist

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if not graphed:
        dist.barrier()
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        return 1e3 * start.elapsed_time(end) / 50
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    dist.barrier()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    dist.barrier()
    torch.cuda.synchronize()
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / 50


def _lamport_rows(rank: int, world: int, device: Any, group: str) -> list[dict[str, Any]]:
    """The Lamport all-reduce (backends/cuda_lamport.py) per size: exact sum check, us eager and in a graph."""
    import torch

    from fxllm.backends import cuda_lamport
    from fxllm.backends.triton.lamport_all_reduce import lamport_all_reduce

    cuda_lamport.configure_group(group, 256 * 1024, 10.0)  # a lost peer traps after 10 s, not 5 minutes
    rows: list[dict[str, Any]] = []
    for tokens in [t for t in TOKENS if t * HIDDEN * 2 <= 256 * 1024]:
        x = torch.randn(tokens, HIDDEN, device=device).to(torch.bfloat16) * (rank + 1)
        out = torch.empty_like(x)
        state = cuda_lamport._state(group, device, x.dtype, 256 * 1024)

        def call(x: torch.Tensor = x, out: torch.Tensor = out, state: Any = state) -> None:
            lamport_all_reduce(x, out, state.peer_ptrs, state.state, state.rank, state.world, state.seg_elems,
                               10**10)  # fmt: skip

        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x)
        expected = sum(p.float() for p in parts).to(torch.bfloat16)  # fp32 in rank order, one rounding
        call()
        torch.cuda.synchronize()
        row: dict[str, Any] = {
            "tokens": tokens,
            "bytes": x.numel() * 2,
            "ok": bool(torch.equal(out, expected)),
        }
        row["eager_us"] = _time_us(call, graphed=False)
        row["graph_us"] = _time_us(call, graphed=True)
        call()
        torch.cuda.synchronize()
        row["ok_after_graphs"] = bool(torch.equal(out, expected))
        rows.append(row)
        if rank == 0:
            logger.info("lamport all-reduce %s", row)
    return rows


def _fused_allreduce_norm_rows(rank: int, world: int, device: Any, group: str) -> list[dict[str, Any]]:
    """The one-kernel all-reduce + add + RMSNorm (backends/triton/allreduce_norm.py) against the unfused
    symm_mem path: largest |difference| of both outputs, and us per call eager and in a CUDA graph."""
    import torch

    from fxllm.backends import cuda_collectives
    from fxllm.backends.triton import allreduce_norm, lamport_add_rms_norm

    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device=device).manual_seed(0)  # same residual and weight on every rank
    for hidden in (4096, 8192):
        weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(torch.bfloat16)
        for tokens in (1, 2, 4, 8, 16, 32):
            row: dict[str, Any] = {"hidden": hidden, "tokens": tokens}
            try:
                x = torch.randn(tokens, hidden, device=device).to(torch.bfloat16) * (rank + 1)
                residual = torch.randn(tokens, hidden, generator=gen, device=device).to(torch.bfloat16)

                args = (x, residual, weight, 1e-5, group)

                def unfused(args: tuple = args) -> Any:
                    return cuda_collectives.all_reduce_add_rms_norm(*args)

                def fused(args: tuple = args) -> Any:
                    return allreduce_norm.all_reduce_add_rms_norm(*args)

                def lamport(args: tuple = args) -> Any:
                    return lamport_add_rms_norm.all_reduce_add_rms_norm(*args)

                ref_norm, ref_sum = unfused()
                got_norm, got_sum = fused()
                torch.cuda.synchronize()
                row["max_abs_diff_norm"] = float((got_norm.float() - ref_norm.float()).abs().max())
                row["max_abs_diff_sum"] = float((got_sum.float() - ref_sum.float()).abs().max())
                row["max_abs_norm"] = float(ref_norm.float().abs().max())
                got_norm, got_sum = lamport()
                torch.cuda.synchronize()
                row["lamport_equal"] = bool(torch.equal(got_norm, ref_norm) and torch.equal(got_sum, ref_sum))
                row["lamport_max_abs_diff_norm"] = float((got_norm.float() - ref_norm.float()).abs().max())
                for name, fn in (("unfused", unfused), ("fused", fused), ("lamport", lamport)):
                    row[f"{name}_eager_us"] = _time_us(fn, graphed=False)
                    row[f"{name}_graph_us"] = _time_us(fn, graphed=True)
            except Exception as exc:  # reported; the next sizes still run
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            rows.append(row)
            if rank == 0:
                logger.info("fused all-reduce + norm %s", row)
    return rows


def child_allreduce(out_file: str) -> None:
    """All-reduce timings over every GPU of the machine."""
    import torch
    import torch.multiprocessing as tmp

    from fxllm.runtime.distributed.group import free_port

    world = torch.cuda.device_count()
    tmp.spawn(_allreduce_rank, args=(world, free_port(), out_file), nprocs=world, join=True)
