"""Decode and verify steps on CUDA graphs: one graph per (batch bucket, query length), replayed padded.

A decode step (every sequence computes exactly one token and samples it) is copied into the static
input buffers of the smallest bucket that holds it; the rows past the real batch are padding that
the ops ignore: slot -1 (no KV write), sequence length 1 over block 0 (finite garbage that nobody
reads). Prefill and mixed steps run the compiled forward directly.

A speculative verify step (every sequence computes its last known token plus d_i drafts and samples
all 1 + d_i rows) replays a bucket of query length Q >= 1 + max(d_i): Q tokens per sequence, causal
inside the chunk. A sequence with fewer drafts has its real tokens first and Q - 1 - d_i padding
tokens after them (slot -1), and its context length is raised by as many positions, so that the
kernels, which take the queries as the last Q positions of the context, place its real queries at
their true positions; the padding queries come after every real one and the causal mask keeps real
queries from seeing them. Only their own (discarded) rows read the unwritten positions past the real
tokens, through block-table entries that are real block ids (stale or 0): finite garbage.

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
    query_len: int = 1  # tokens per sequence: 1 for decode, 1 + k for a verify step with k drafts
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None
    setup_seconds: float = 0.0  # warm-up (first use compiles kernels for this size) plus capture


def _static_inputs(
    size: int, max_blocks: int, device: torch.device, query_len: int = 1
) -> dict[str, torch.Tensor]:
    """Buffers already holding padding; query starts and sampled rows never change in a bucket."""

    def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    tokens = size * query_len
    return {
        "input_ids": zeros(1, tokens, dtype=torch.long),
        "position_ids": zeros(1, tokens, dtype=torch.long),
        "slot_mapping": torch.full((tokens,), -1, dtype=torch.long, device=device),
        "block_tables": zeros(size, max_blocks, dtype=torch.int32),
        # A padding row's Q queries sit at positions 0..Q-1 of block 0 (or of block 0 repeated).
        "seq_lens": torch.full((size,), query_len, dtype=torch.int32, device=device),
        "query_start_loc": torch.arange(0, tokens + 1, query_len, dtype=torch.int32, device=device),
        "logits_indices": torch.arange(tokens, dtype=torch.long, device=device),
    }


def verify_query_lens(num_speculative_tokens: int) -> list[int]:
    """Query lengths of the verify buckets for up to k drafts: every 1 + d for d = 1..k, so that a batch-1
    step (always uniform) replays a graph of exactly its size and n-gram's shorter drafts pad nothing."""
    return list(range(2, num_speculative_tokens + 2))


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
        query_lens: list[int] | None = None,
        verify_max_batch: int = 0,
    ) -> None:
        """`query_lens`: verify buckets' tokens per sequence (each > 1), captured for the batch sizes up to
        `verify_max_batch` (0: all of them)."""
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"cuda_graph_batch_sizes must be positive integers, got {batch_sizes}")
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}; set compile.cuda_graphs=false")
        verify = sorted(set(query_lens or []))
        if verify and min(verify) < 2:
            raise ValueError(f"verify query lengths must be at least 2 (1 + drafts), got {verify}")
        self._forward = forward
        self._signature = signature
        self._kv_caches = kv_caches
        self._device = device
        self.max_blocks_per_seq = max_blocks_per_seq
        self.capture_enabled = capture
        sizes = sorted(set(batch_sizes))
        self.buckets = [
            DecodeBucket(size, _static_inputs(size, max_blocks_per_seq, device)) for size in sizes
        ]
        # A padded verify row reads up to Q - 1 positions past its real context: room for them in the table.
        verify_blocks = max_blocks_per_seq + max(verify, default=0)
        self.verify_buckets = [
            DecodeBucket(size, _static_inputs(size, verify_blocks, device, q), query_len=q)
            for q in verify
            for size in sizes
            if not verify_max_batch or size <= verify_max_batch
        ]
        self.num_replays = 0
        self.num_verify_replays = 0
        self.num_verify_padded = 0  # verify replays whose sequences had unequal draft counts
        self.num_too_large = 0  # decode steps above the largest bucket (run without a graph)
        self.num_verify_unmatched = 0  # verify steps no verify bucket holds (run without a graph)

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
        every = sorted(self.buckets + self.verify_buckets, key=lambda b: (b.size * b.query_len, b.size))
        for bucket in reversed(every):
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
            "decode buckets %s, verify buckets (batch, 1 + k) %s %s in %.1f s",
            [b.size for b in self.buckets], [(b.size, b.query_len) for b in self.verify_buckets],
            "captured" if self.capture_enabled else "warmed up", seconds,
        )  # fmt: skip
        return seconds

    def accepts(self, inputs: StepInputs) -> bool:
        """Whether this step is a pure decode or verify step that fits a bucket."""
        num_seqs = inputs.seq_lens.shape[0]
        counts = inputs.draft_counts
        if len(inputs.sampled) != num_seqs or inputs.prompt_rows:
            return False  # prefill or mixed: runs the forward directly, by design
        # Every sequence schedules at least its 1 + d_i tokens, so equality means none schedules more.
        if inputs.input_ids.shape[1] != num_seqs + sum(counts):
            return False  # a chunk that ends at the last prompt token samples too: a prefill
        if any(counts):
            return self._verify_bucket(num_seqs, 1 + max(counts), inputs.block_tables.shape[1]) is not None
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

    def _verify_bucket(self, num_seqs: int, query_len: int, width: int) -> DecodeBucket | None:
        """The verify bucket with the fewest tokens that holds num_seqs x query_len (None: logged, counted)."""
        fits = [
            b
            for b in self.verify_buckets
            if b.size >= num_seqs and b.query_len >= query_len and b.inputs["block_tables"].shape[1] >= width
        ]
        if fits:
            return min(fits, key=lambda b: (b.size * b.query_len, b.size))
        self.num_verify_unmatched += 1
        if self.num_verify_unmatched == 1 or self.num_verify_unmatched % 1000 == 0:
            logger.warning(
                "verify step of %d sequences x %d tokens fits no verify CUDA-graph bucket %s; ran without a "
                "graph (%d times so far)", num_seqs, query_len,
                sorted({(b.size, b.query_len) for b in self.verify_buckets}), self.num_verify_unmatched,
            )  # fmt: skip
        return None

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Pad the step into its bucket, run it; returns logits [num rows, V] (model dtype)."""
        if any(inputs.draft_counts):
            return self._run_verify(inputs)
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
        logits = self._replay(bucket)
        self.num_replays += 1
        return logits[:num_seqs]

    def _run_verify(self, inputs: StepInputs) -> torch.Tensor:
        """A verify step: each sequence's 1 + d_i tokens at the start of its Q-token row (module docstring)."""
        num_seqs, counts = inputs.seq_lens.shape[0], inputs.draft_counts
        query_len = 1 + max(counts)
        bucket = self._verify_bucket(num_seqs, query_len, inputs.block_tables.shape[1])
        assert bucket is not None, "run() without accepts()"
        q, static = bucket.query_len, bucket.inputs
        num_tokens = num_seqs + sum(counts)
        uniform = all(1 + d == q for d in counts)
        if uniform:  # the common case (batch 1 always, when a bucket of its exact length exists)
            static["input_ids"][:, :num_tokens].copy_(inputs.input_ids)
            static["position_ids"][:, :num_tokens].copy_(inputs.position_ids)
            static["slot_mapping"][:num_tokens].copy_(inputs.slot_mapping)
            static["seq_lens"][:num_seqs].copy_(inputs.seq_lens)
            rows = None
        else:
            dest_list = [i * q + j for i, d in enumerate(counts) for j in range(1 + d)]
            extra = [q - 1 - d for d in counts]
            dest, extend = _host_tensor(dest_list, self._device), _host_tensor(extra, self._device)
            static["input_ids"][0].index_copy_(0, dest, inputs.input_ids[0])
            static["position_ids"][0].index_copy_(0, dest, inputs.position_ids[0])
            static["slot_mapping"][: num_seqs * q].fill_(-1)  # the padding tokens after each row's real ones
            static["slot_mapping"].index_copy_(0, dest, inputs.slot_mapping)
            torch.add(inputs.seq_lens, extend.to(torch.int32), out=static["seq_lens"][:num_seqs])
            rows = dest
            self.num_verify_padded += 1
        width = inputs.block_tables.shape[1]
        static["block_tables"][:num_seqs, :width].copy_(inputs.block_tables)
        if num_seqs < bucket.size:  # padding rows must never write the cache
            static["slot_mapping"][num_seqs * q :].fill_(-1)
            static["seq_lens"][num_seqs:].fill_(q)
        logits = self._replay(bucket)
        self.num_verify_replays += 1
        return logits[:num_tokens] if rows is None else logits.index_select(0, rows)

    def _replay(self, bucket: DecodeBucket) -> torch.Tensor:
        """The bucket's logits: its graph replayed, or (no capture) the forward on its static inputs."""
        if bucket.graph is not None and bucket.logits is not None:
            bucket.graph.replay()
            return bucket.logits
        return self._forward(*self._args(bucket))[0]  # type: ignore[index,no-any-return]


def _host_tensor(data: list[int], device: torch.device) -> torch.Tensor:
    """A small index list on `device` without blocking the host (pinned copy on CUDA)."""
    tensor = torch.tensor(data, dtype=torch.long)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor
