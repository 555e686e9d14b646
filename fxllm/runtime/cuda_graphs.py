"""Decode steps on CUDA graphs: one graph per batch-size bucket, captured at start-up, replayed padded.

A decode step (every sequence computes exactly one token and samples it) is copied into the static
input buffers of the smallest bucket that holds it; the rows past the real batch are padding that
the ops ignore: slot -1 (no KV write), sequence length 1 over block 0 (finite garbage that nobody
reads). Prefill and mixed steps run the compiled forward directly.

On the CPU the same padded path runs without capture (`capture=False`), which is how the tests
check the padding semantics on machines without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fxllm.passes.runtime_signature import RuntimeSignature
from fxllm.runtime.step_inputs import StepInputs

logger = logging.getLogger(__name__)


@dataclass
class DecodeBucket:
    """Static inputs of one batch size, its captured graph and the graph's output logits."""

    size: int
    inputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None
    setup_seconds: float = 0.0  # warm-up (first use compiles kernels for this size) plus capture


def _static_inputs(size: int, max_blocks: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Buffers already holding padding; query starts and sampled rows never change in decode."""

    def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    return {
        "input_ids": zeros(1, size, dtype=torch.long),
        "position_ids": zeros(1, size, dtype=torch.long),
        "slot_mapping": torch.full((size,), -1, dtype=torch.long, device=device),
        "block_tables": zeros(size, max_blocks, dtype=torch.int32),
        "seq_lens": torch.ones(size, dtype=torch.int32, device=device),
        "query_start_loc": torch.arange(size + 1, dtype=torch.int32, device=device),
        "logits_indices": torch.arange(size, dtype=torch.long, device=device),
    }


class DecodeGraphs:
    """Batch-size buckets for decode steps; `run` pads a step to its bucket and replays the graph."""

    def __init__(
        self,
        forward: Callable[..., object],
        signature: RuntimeSignature,
        kv_caches: dict[str, torch.Tensor],
        batch_sizes: list[int],
        max_blocks_per_seq: int,
        device: torch.device,
        *,
        capture: bool,
    ) -> None:
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"cuda_graph_batch_sizes must be positive integers, got {batch_sizes}")
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}; set compile.cuda_graphs=false")
        self._forward = forward
        self._signature = signature
        self._kv_caches = kv_caches
        self.max_blocks_per_seq = max_blocks_per_seq
        self.capture_enabled = capture
        self.buckets = [
            DecodeBucket(size, _static_inputs(size, max_blocks_per_seq, device))
            for size in sorted(set(batch_sizes))
        ]
        self.num_replays = 0
        self.num_too_large = 0  # decode steps above the largest bucket (run without a graph)

    @property
    def max_batch_size(self) -> int:
        """The largest bucket."""
        return self.buckets[-1].size

    def _args(self, bucket: DecodeBucket) -> list[torch.Tensor]:
        return self._signature.arguments(bucket.inputs, self._kv_caches)

    def capture_all(self) -> float:
        """Warm up and capture every bucket, largest first so that smaller ones reuse its memory."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if self.capture_enabled else None
        for bucket in reversed(self.buckets):
            bucket_start = time.perf_counter()
            args = self._args(bucket)
            # Once outside capture: Inductor's kernels autotune on a first call, and a shape that needed a
            # compile would compile here (none should: warm-up covers every variant, see Engine.warmup).
            self._forward(*args)
            if not self.capture_enabled:
                continue
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(*args)
            bucket.graph, bucket.logits = graph, out[0]  # type: ignore[index]
            bucket.setup_seconds = time.perf_counter() - bucket_start
        if self.capture_enabled:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        logger.info(
            "decode buckets %s %s in %.1f s",
            [b.size for b in self.buckets], "captured" if self.capture_enabled else "warmed up", seconds,
        )  # fmt: skip
        return seconds

    def accepts(self, inputs: StepInputs) -> bool:
        """Whether this step is a pure decode step that fits a bucket."""
        num_seqs = inputs.seq_lens.shape[0]
        if inputs.input_ids.shape[1] != num_seqs or len(inputs.sampled) != num_seqs:
            return False  # prefill or mixed: runs the forward directly, by design
        if num_seqs > self.max_batch_size or inputs.block_tables.shape[1] > self.max_blocks_per_seq:
            self.num_too_large += 1
            if self.num_too_large == 1 or self.num_too_large % 1000 == 0:
                logger.warning(
                    "decode step of %d sequences is larger than the largest CUDA-graph bucket (%d); "
                    "ran without a graph (%d times so far): add a larger compile.cuda_graph_batch_sizes",
                    num_seqs, self.max_batch_size, self.num_too_large,
                )  # fmt: skip
            return False
        return True

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Pad the decode step into its bucket, run it; returns logits [num_seqs, V] (model dtype)."""
        num_seqs = inputs.seq_lens.shape[0]
        bucket = next(b for b in self.buckets if b.size >= num_seqs)
        static = bucket.inputs
        static["input_ids"][:, :num_seqs].copy_(inputs.input_ids)
        static["position_ids"][:, :num_seqs].copy_(inputs.position_ids)
        static["slot_mapping"][:num_seqs].copy_(inputs.slot_mapping)
        static["seq_lens"][:num_seqs].copy_(inputs.seq_lens)
        width = inputs.block_tables.shape[1]
        # Columns past `width` may hold an earlier step's blocks: the kernels read only the blocks
        # that seq_lens covers, so they are never used.
        static["block_tables"][:num_seqs, :width].copy_(inputs.block_tables)
        if num_seqs < bucket.size:  # padding rows must never write the cache
            static["slot_mapping"][num_seqs:].fill_(-1)
            static["seq_lens"][num_seqs:].fill_(1)
        if bucket.graph is not None and bucket.logits is not None:
            bucket.graph.replay()
            logits = bucket.logits
        else:
            logits = self._forward(*self._args(bucket))[0]  # type: ignore[index]
        self.num_replays += 1
        return logits[:num_seqs]
