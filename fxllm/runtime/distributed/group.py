"""The process group of a tensor-parallel engine: backend choice, rendezvous, each rank's device."""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

from fxllm.config import ParallelConfig

logger = logging.getLogger(__name__)


def resolve_backend(parallel: ParallelConfig, device: torch.device) -> str:
    """The c10d backend: nccl on CUDA and gloo on the CPU for "auto"; nccl on the CPU is an error."""
    backend = parallel.distributed_backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            "parallel.distributed_backend=nccl needs CUDA devices; use gloo (or auto) on the CPU"
        )
    return backend


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank `rank`'s device: cuda:<rank> on a GPU machine (one GPU per rank), the CPU otherwise."""
    if device.type != "cuda":
        return torch.device("cpu")
    if rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"tensor parallelism: rank {rank} needs GPU {rank}, but this machine has {torch.cuda.device_count()}"
        )
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def init_group(
    parallel: ParallelConfig, rank: int, port: int, device: torch.device, dtype: torch.dtype | None = None
) -> str:
    """Join the group of `parallel.tensor_parallel_size` ranks at 127.0.0.1:`port`; returns its name. On
    CUDA the all-reduce's symmetric buffer for `dtype` is made here, by every rank at once."""
    backend = resolve_backend(parallel, device)
    timeout = datetime.timedelta(seconds=parallel.collective_timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=parallel.tensor_parallel_size, timeout=timeout, **kwargs,
    )  # fmt: skip
    group = dist.group.WORLD
    assert group is not None
    if device.type == "cuda":
        from fxllm.backends.cuda_collectives import configure_group

        configure_group(
            str(group.group_name), parallel.one_shot_max_bytes, parallel.two_shot_max_bytes, device, dtype
        )
        from fxllm.backends import cuda_lamport

        cuda_lamport.configure_group(
            str(group.group_name), parallel.lamport_max_bytes, parallel.collective_timeout_s
        )
    logger.info("rank %d of %d joined the %s group %r on %s", rank, parallel.tensor_parallel_size, backend,
                group.group_name, device)  # fmt: skip
    return str(group.group_name)


def destroy_group() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def cpu_threads_per_rank(size: int) -> int:
    """Give this CPU rank its share of the cores (each rank runs every step at once: with all cores each, their
    OpenMP threads would spin against each other while one waits in a collective)."""
    threads = max(1, (os.cpu_count() or 1) // size)
    torch.set_num_threads(threads)
    return threads
