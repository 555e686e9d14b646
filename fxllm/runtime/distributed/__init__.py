"""Tensor parallelism's runtime: one process per rank, rank 0 schedules and samples (docs/parallelism.md)."""

from __future__ import annotations

from fxllm.runtime.distributed.launcher import (
    RankDied,
    RankZeroRunner,
    TensorParallelGroup,
    start_tensor_parallel,
)
from fxllm.runtime.distributed.sharding import TensorParallelInfo, tensor_parallel_info

__all__ = [
    "RankDied",
    "RankZeroRunner",
    "TensorParallelGroup",
    "TensorParallelInfo",
    "start_tensor_parallel",
    "tensor_parallel_info",
]
