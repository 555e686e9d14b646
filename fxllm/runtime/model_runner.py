"""Runs the compiled forward over a paged KV cache: pool sizing, allocation, one call per step."""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule

from fxllm.compiler.backends import get_graph_backend
from fxllm.config import CacheConfig
from fxllm.passes.runtime_signature import KVCacheLayer, require_signature
from fxllm.runtime.cuda_graphs import DecodeGraphs
from fxllm.runtime.step_inputs import StepInputs

logger = logging.getLogger(__name__)


def bytes_per_block(layers: list[KVCacheLayer], block_size: int) -> int:
    """Bytes one block takes across every layer's key and value cache."""
    return sum(
        block_size * layer.num_kv_heads * (layer.head_dim_k + layer.head_dim_v) * layer.dtype.itemsize
        for layer in layers
    )


def plan_num_blocks(layers: list[KVCacheLayer], config: CacheConfig, device: torch.device) -> int:
    """How many blocks the pool gets: forced, a CPU byte budget, or a fraction of free GPU memory."""
    if config.num_blocks is not None:
        return config.num_blocks
    per_block = bytes_per_block(layers, config.block_size)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * config.gpu_memory_fraction)
    else:
        budget = config.cpu_kv_bytes
    num_blocks = budget // per_block
    if num_blocks < 2:
        raise RuntimeError(
            f"the KV cache budget ({budget / 2**20:.0f} MiB) holds fewer than 2 blocks of {per_block} bytes; "
            "raise cache.cpu_kv_bytes / cache.gpu_memory_fraction or lower cache.block_size"
        )
    return int(num_blocks)


class ModelRunner:
    """Owns the KV cache pool and calls the compiled graph with each step's inputs."""

    def __init__(
        self,
        gm: GraphModule,
        backend: str,
        device: torch.device,
        dtype: torch.dtype,
        cache_config: CacheConfig,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.block_size = cache_config.block_size
        self.signature = require_signature(gm)
        self.layer_shapes = self.signature.kv_layers
        self.num_blocks = plan_num_blocks(self.layer_shapes, cache_config, device)
        self._cache_by_name: dict[str, torch.Tensor] = {}
        for layer in self.layer_shapes:
            for name, head_dim in (
                (layer.key_input, layer.head_dim_k),
                (layer.value_input, layer.head_dim_v),
            ):
                shape = (self.num_blocks, self.block_size, layer.num_kv_heads, head_dim)
                self._cache_by_name[name] = torch.zeros(shape, dtype=layer.dtype, device=device)
        self.kv_caches = list(self._cache_by_name.values())
        for cache in self.kv_caches:
            # The pool never changes shape. Left to `dynamic=True`, each cache got symbolic sizes of
            # its own: ~130 symbols whose guards Dynamo checked on every call (0.4 ms per step).
            torch._dynamo.mark_static(cache)
        pool_bytes = sum(t.numel() * t.element_size() for t in self.kv_caches)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.0f MiB) over %d layers",
            self.num_blocks, self.block_size, self.capacity_tokens, pool_bytes / 2**20, len(self.layer_shapes),
        )  # fmt: skip
        self.graph_module = gm
        self._forward = get_graph_backend(backend)(gm)
        self.decode_graphs: DecodeGraphs | None = None
        # EAGLE-3: the graph also returns hidden states (pass expose_hidden_states); `execute` keeps the last
        # step's (inputs, hidden [T, width]) for the head to read. Graphs without them pay nothing.
        self.returns_hidden = _num_outputs(gm) > 1
        self.hidden_width = 0
        self.last_hidden: tuple[StepInputs, torch.Tensor] | None = None
        # Speculative decoding (build_speculator sets them): verify buckets' 1 + k query lengths, captured
        # with the decode buckets up to this batch size (0: every size).
        self.verify_query_lens: list[int] = []
        self.verify_max_batch = 0

    def enable_decode_graphs(
        self,
        batch_sizes: list[int],
        max_model_len: int,
        *,
        capture: bool,
        query_lens: list[int] | None = None,
        verify_max_batch: int = 0,
    ) -> float:
        """Set up decode buckets (CUDA graphs when `capture`, else padded eager) and, for speculative
        decoding, verify buckets of `query_lens` tokens per sequence; returns seconds taken."""
        max_blocks = -(-max_model_len // self.block_size)
        forward = self._packed_forward if self.returns_hidden else self._forward
        self.decode_graphs = DecodeGraphs(
            forward, self.signature, self._cache_by_name, batch_sizes, max_blocks, self.device,
            capture=capture,
            query_lens=self.verify_query_lens if query_lens is None else query_lens,
            verify_max_batch=verify_max_batch or self.verify_max_batch,
        )  # fmt: skip
        with torch.inference_mode():
            return self.decode_graphs.capture_all()

    @property
    def num_compiles(self) -> int | None:
        """Variants compiled so far (None when the graph backend does not compile)."""
        return getattr(self._forward, "num_compiles", None)

    def freeze_guards(self) -> bool:
        """Skip Dynamo's guard checks from now on, where the graph backend supports it."""
        freeze = getattr(self._forward, "freeze_guards", None)
        if freeze is None:
            return False
        freeze()
        return True

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step; returns logits [N, V] for the sampled tokens, in the model's dtype (the sampler
        converts what it needs; a greedy CPU batch reads bfloat16 logits as they are)."""
        if self.decode_graphs is not None and self.decode_graphs.accepts(inputs):
            logits = self.decode_graphs.run(inputs)
            if self.returns_hidden:  # decode / verify buckets sample every token: rows are the step's tokens
                # contiguous: the sampler's kernels may take the logits as a dense [N, V] tensor
                logits, hidden = logits[:, : -self.hidden_width].contiguous(), logits[:, -self.hidden_width :]
                self.last_hidden = (inputs, hidden)
            return logits
        args = self.signature.arguments(inputs.named_args(), self._cache_by_name)
        out = self._forward(*args)
        logits = out[0]  # type: ignore[index]  # [1, N or T, V] -> [N or T, V]
        if self.returns_hidden:  # (logits [1, N, V], hidden [1, T, width])
            logits, hidden = logits[0], out[1][0]  # type: ignore[index]
            self.last_hidden = (inputs, hidden)
        if self.signature.logits_rows == "all":  # no LM head was found to gather before
            return logits.index_select(0, inputs.logits_indices)
        return logits

    def _packed_forward(self, *args: torch.Tensor) -> tuple[torch.Tensor]:
        """The forward for decode / verify buckets when hidden states are returned: (logits | hidden,) in one
        tensor, so the buckets (which keep and slice output 0) carry both; their rows are the step's tokens."""
        out = self._forward(*args)
        logits, hidden = out[0], out[1]  # type: ignore[index]
        logits = logits.reshape(-1, logits.shape[-1])
        hidden = hidden.reshape(-1, hidden.shape[-1]).to(logits.dtype)
        self.hidden_width = hidden.shape[-1]
        return (torch.cat([logits, hidden], dim=-1),)


def _num_outputs(gm: GraphModule) -> int:
    """How many values the graph returns."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    result = output.args[0]
    return len(result) if isinstance(result, (tuple, list)) else 1
