"""All-reduce on every GPU of the machine: the Lamport kernel (triton_lamport) vs symm_mem one-shot vs NCCL.

Usage (GPU machine, repo root; < 150 s on 2 H100s):
    PYTHONPATH=. python3 benchmarks/gpu_allreduce.py --out $OUT [--budget-s 150]
One process per GPU (spawned), joined as fxllm joins a tensor-parallel group (runtime/distributed/group.py:
NCCL, symmetric-memory buffers). Per message size, bf16, 8 KB .. 1 MB:
  (a) correctness of the Lamport kernel (called directly: the backend routes eager calls to symm_mem):
      200 eager calls with new data each (some -0.0 entries), then
      one CUDA graph of 64 calls replayed 50 times with new inputs copied in between, each replay followed
      by one eager call (eager and graph calls share the device-side slot); every result must EQUAL the
      fp32 sum in rank order rounded once to bf16, on every rank (so the ranks are bit-identical); the
      largest difference to NCCL's sum is reported;
  (b) latency: a CUDA graph of 64 calls on one input, replay time / 64, for triton_lamport, symm_mem
      one-shot (cuda_collectives.all_reduce, one-shot up to 1 MiB here) and NCCL; eager us per call too.
Never hangs: the Lamport spin traps after 10 s (parallel.collective_timeout_s), each rank has a watchdog
that dumps its stacks and exits, and the parent kills ranks still alive at the budget. Rank 0 rewrites
the results after every size, so a crash keeps the sizes before it. Writes $OUT/allreduce.json, prints
a table. `--smoke`: the CPU over gloo (2 processes), NCCL's place taken by gloo and no kernel of ours
(the Lamport kernel cannot run on the CPU): checks the script's structure and the engine override
`compile.op_backends={all_reduce: triton_lamport}` parsing.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("fxllm.gpu.allreduce")
SIZES = [8 * 1024 * 2**i for i in range(8)]  # 8 KB .. 1 MB
GRAPH_CALLS = 64
GRAPH_REPLAYS = 50
EAGER_CALLS = 200
SPIN_TIMEOUT_S = 10.0


def _inputs(world: int, shape: tuple[int, ...], seed: int, device: Any) -> Any:
    """Every rank's input for one step (each rank makes all of them, so each can compute the sum)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    xs = torch.randn((world, *shape), generator=gen, device=device).to(torch.bfloat16)
    xs[..., seed % 7 :: 7] = -0.0  # the sentinel's bit pattern must travel as +0.0
    return xs


def _reference(xs: Any) -> Any:
    """The fp32 sum in rank order, rounded once."""
    total = xs[0].float()
    for x in xs[1:]:
        total = total + x.float()
    return total.to(xs.dtype)


def _lamport(x: Any, group: str) -> Any:
    """The Lamport kernel itself, eager or captured (cuda_lamport.all_reduce sends eager calls to symm_mem)."""
    import torch

    from fxllm.backends import cuda_lamport
    from fxllm.backends.triton.lamport_all_reduce import lamport_all_reduce

    limits = cuda_lamport.limits(group)
    state = cuda_lamport._state(group, x.device, x.dtype, limits.max_bytes)
    out = torch.empty_like(x)
    lamport_all_reduce(x.contiguous(), out, state.peer_ptrs, state.state, state.rank, state.world,
                       state.seg_elems, int(limits.timeout_s * 1e9))  # fmt: skip
    return out


def _check_size(
    rank: int, world: int, n: int, device: Any, reduce: Callable[[Any], Any], graphs: bool
) -> dict:
    """(a): mismatches of `reduce` against the reference, eager and in a replayed CUDA graph."""
    import torch
    import torch.distributed as dist

    bad = calls = 0
    nccl_diff = 0.0
    for i in range(EAGER_CALLS):
        xs = _inputs(world, (n,), 1000 * n + i, device)
        out = reduce(xs[rank])
        ref = _reference(xs)
        bad += int(not torch.equal(out, ref))
        calls += 1
        if i % 50 == 0:  # NCCL's own sum, for the record (its order of additions is its own)
            other = xs[rank].clone()
            dist.all_reduce(other)
            nccl_diff = max(nccl_diff, float((other.float() - ref.float()).abs().max()))
    row: dict[str, Any] = {"eager_calls": calls, "eager_mismatches": bad, "max_abs_diff_vs_nccl": nccl_diff}
    if not graphs:
        return row
    inp = torch.zeros(GRAPH_CALLS, n, dtype=torch.bfloat16, device=device)
    outs = torch.zeros_like(inp)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(GRAPH_CALLS):
            outs[j].copy_(reduce(inp[j]))
    torch.cuda.synchronize()
    dist.barrier()
    graph_bad = interleaved_bad = 0
    for rep in range(GRAPH_REPLAYS):
        xs = _inputs(world, (GRAPH_CALLS, n), 7919 * n + rep, device)
        inp.copy_(xs[rank])
        graph.replay()
        graph_bad += int((outs != _reference(xs)).any(dim=1).sum())
        ys = _inputs(world, (n,), 104729 * n + rep, device)  # one eager call between replays
        interleaved_bad += int(not torch.equal(reduce(ys[rank]), _reference(ys)))
    torch.cuda.synchronize()
    row.update(graph_calls=GRAPH_CALLS * GRAPH_REPLAYS, graph_mismatches=graph_bad,
               interleaved_calls=GRAPH_REPLAYS, interleaved_mismatches=interleaved_bad)  # fmt: skip
    return row


def _latency_us(fn: Callable[[], Any], device: Any, graphs: bool) -> dict[str, float | None]:
    """(b): us per call, eager (50 calls) and as replays of a CUDA graph of 64 calls / 64."""
    import torch
    import torch.distributed as dist

    result: dict[str, float | None] = {}
    if not graphs:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(50):
            fn()
        result["eager_us"] = (time.perf_counter() - start) * 1e6 / 50
        return result
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    begin.record()
    for _ in range(50):
        fn()
    end.record()
    torch.cuda.synchronize()
    result["eager_us"] = 1e3 * begin.elapsed_time(end) / 50
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        dist.barrier()
        replays = 20
        begin.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        result["graph_us"] = 1e3 * begin.elapsed_time(end) / (replays * GRAPH_CALLS)
    except Exception as exc:  # reported; the other methods still run
        result["graph_us"] = None
        result["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]  # type: ignore[assignment]
    return result


def _watchdog(seconds: float, rank: int) -> None:
    def fire() -> None:
        sys.stderr.write(f"rank {rank}: watchdog after {seconds:.0f} s, stacks:\n")
        faulthandler.dump_traceback(all_threads=True)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def _worker(
    rank: int,
    world: int,
    port: int,
    smoke: bool,
    out_file: str,
    watchdog_s: float,
    min_block_bytes: int | None,
) -> None:
    """One rank: join the group as fxllm does, then (a) and (b) per size; rank 0 writes the results."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s")
    _watchdog(watchdog_s, rank)
    if min_block_bytes is not None and not smoke:
        from fxllm.backends.triton import lamport_all_reduce

        lamport_all_reduce.MIN_BLOCK_BYTES = min_block_bytes
    import torch
    import torch.distributed as dist

    from fxllm.config import ParallelConfig
    from fxllm.runtime.distributed.group import init_group, rank_device

    parallel = ParallelConfig(tensor_parallel_size=world, lamport_max_bytes=SIZES[-1], one_shot_max_bytes=SIZES[-1],
                              collective_timeout_s=SPIN_TIMEOUT_S)  # fmt: skip
    device = rank_device(torch.device("cpu" if smoke else "cuda"), rank)
    group = init_group(parallel, rank, port, device, torch.bfloat16)
    results: dict[str, Any] = {"world": world, "smoke": smoke, "rows": []}
    if not smoke:
        from fxllm.backends import cuda_collectives, cuda_lamport

        results["device"] = torch.cuda.get_device_name(device)
        results["torch"] = torch.__version__
    sizes = SIZES[:2] if smoke else SIZES
    for nbytes in sizes:
        n = nbytes // 2
        row: dict[str, Any] = {"bytes": nbytes}
        x = torch.randn(n, device=device).to(torch.bfloat16)

        def nccl_out_of_place(x: Any) -> Any:
            out = x.clone()
            dist.all_reduce(out)
            return out

        try:
            if smoke:  # gloo stands in for the kernels: the same checks and timers run
                row["lamport"] = _check_size(rank, world, n, device, nccl_out_of_place, graphs=False)
                row["lamport"].update(_latency_us(lambda x=x: nccl_out_of_place(x), device, graphs=False))
            else:
                row["lamport"] = _check_size(
                    rank, world, n, device, lambda t: _lamport(t, group), graphs=True
                )
                row["lamport"].update(_latency_us(lambda x=x: _lamport(x, group), device, graphs=True))
                row["symm_mem"] = _latency_us(
                    lambda x=x: cuda_collectives.all_reduce(x, group), device, graphs=True
                )
                static = x.clone()
                row["nccl"] = _latency_us(lambda static=static: dist.all_reduce(static), device, graphs=True)
                row["counts"] = {"lamport": dict(vars(cuda_lamport.COUNTS)),
                                 "symm_mem": dict(vars(cuda_collectives.COUNTS))}  # fmt: skip
        except Exception as exc:  # reported, the next size still runs (a trap ends the process instead)
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        # Every rank's mismatches, summed: equal to the reference on every rank = bit-identical ranks.
        counts = torch.tensor([row.get("lamport", {}).get(k, 0) for k in
                               ("eager_mismatches", "graph_mismatches", "interleaved_mismatches")],
                              dtype=torch.int64, device=device)  # fmt: skip
        dist.all_reduce(counts)
        row["mismatches_all_ranks"] = [int(v) for v in counts.tolist()]
        results["rows"].append(row)
        if rank == 0:
            logger.info("%s", row)
            Path(out_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _table(results: dict[str, Any]) -> str:
    lines = [f"all-reduce over {results.get('world')} ranks ({results.get('device', 'cpu')}): us per call, "
             f"CUDA graph of {GRAPH_CALLS} calls (eager in brackets); mismatches eager/graph/interleaved"]  # fmt: skip
    lines.append(f"{'bytes':>8} {'lamport':>16} {'symm_mem':>16} {'nccl':>16}  mismatches  vs-nccl")
    for row in results.get("rows", []):

        def cell(name: str, row: dict[str, Any] = row) -> str:
            r = row.get(name) or {}
            graph, eager = r.get("graph_us"), r.get("eager_us")
            g = f"{graph:.1f}" if graph is not None else "-"
            return f"{g} ({eager:.1f})" if eager is not None else g

        diff = (row.get("lamport") or {}).get("max_abs_diff_vs_nccl")
        lines.append(f"{row['bytes']:>8} {cell('lamport'):>16} {cell('symm_mem'):>16} {cell('nccl'):>16}  "
                     f"{row.get('mismatches_all_ranks')!s:>10}  {diff}" + (f"  ERROR {row['error']}" if "error" in row else ""))  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    """Spawn the ranks, wait at most the budget, write allreduce.json and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--budget-s", type=float, default=150.0, help="the whole run, ranks killed after it")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo: checks the script only")
    parser.add_argument("--min-block-bytes", type=int, default=None,
                        help="the Lamport kernel's bytes per program (a tuning sweep; default: the module's)")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch.multiprocessing as mp

    from fxllm.runtime.distributed.group import free_port

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if args.smoke:
        from fxllm.config import load_config

        config = load_config(overrides=["compile.op_backends={all_reduce: triton_lamport}"])
        results["override_parses"] = config.compile.op_backends == {"all_reduce": "triton_lamport"}
        world = 2
    else:
        import torch

        world = torch.cuda.device_count()
        if world < 2:
            raise SystemExit(f"gpu_allreduce.py needs 2 or more GPUs, this machine has {world}")
    start = time.perf_counter()
    rank_file = out / "allreduce_rank0.json"
    ctx = mp.get_context("spawn")
    watchdog_s = max(10.0, args.budget_s - 15.0)
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args.smoke, str(rank_file), watchdog_s,
                                               args.min_block_bytes))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    deadline = start + args.budget_s - 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.perf_counter()))
    killed = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in killed:
        procs[r].kill()
        procs[r].join()
    if rank_file.exists():
        results.update(json.loads(rank_file.read_text()))
    results["exit_codes"] = [p.exitcode for p in procs]
    results["killed_at_budget"] = killed
    results["wall_s"] = time.perf_counter() - start
    results["min_block_bytes"] = args.min_block_bytes
    (out / "allreduce.json").write_text(json.dumps(results, indent=1))
    print(_table(results))
    print(f"exit codes {results['exit_codes']}, killed {killed}, {results['wall_s']:.0f} s")
    ok = not killed and all(c == 0 for c in results["exit_codes"]) and all(
        sum(r.get("mismatches_all_ranks") or [1]) == 0 and "error" not in r for r in results.get("rows", [])
    )  # fmt: skip
    return 0 if ok and results.get("rows") else 1


if __name__ == "__main__":
    sys.exit(main())
