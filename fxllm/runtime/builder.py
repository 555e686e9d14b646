"""Builds an Engine from config: load -> capture -> passes (runtime ones included) -> bind -> compile."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from fxllm.compiler.cache_build import build_graph
from fxllm.config import FxllmConfig
from fxllm.passes.lower_ops import implementations_chosen
from fxllm.passes.pipeline import PassReport, load_plugins
from fxllm.runtime.engine import Engine, resolve_device_dtype, resolve_eos_token_ids
from fxllm.runtime.gc_heap import should_freeze
from fxllm.runtime.model_runner import ModelRunner
from fxllm.runtime.scheduler import resolve_scheduler_limits
from fxllm.runtime.speculative.decoder import build_speculator
from fxllm.runtime.speculative.drafters import build_drafter, drafter_source
from fxllm.runtime.speculative.eagle3 import with_hidden_state_outputs

logger = logging.getLogger(__name__)


@dataclass
class BuildInfo:
    """What start-up did, for logs and `fxllm serve`'s banner."""

    model_name: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    capture_seconds: float
    passes_seconds: float
    pass_report: PassReport
    op_backends: dict[str, str]
    warmup_seconds: float = 0.0  # compile of the forward happens here (first call)
    decode_graph_seconds: float = 0.0  # capturing the CUDA graphs of the decode buckets
    decode_graph_sizes: tuple[int, ...] = ()
    compile_cache: str = "off"  # "hit", "miss (why)" or "off (why)": the post-pass graph's compile cache
    cache_seconds: float = 0.0  # reading the cached graph (hit) or writing it (miss)

    def summary(self) -> str:
        """One line per fact, for the start-up log."""
        counts = {r.name: r.matches for r in self.pass_report.records if r.status == "ran"}
        graph = (
            f"graph from the compile cache {self.cache_seconds:.1f} s"
            if self.compile_cache == "hit"
            else f"capture {self.capture_seconds:.1f} s, passes {self.passes_seconds:.1f} s"
            + (f", cache write {self.cache_seconds:.1f} s" if self.compile_cache.startswith("miss") else "")
        )
        return (
            f"model {self.model_name} on {self.device} ({self.dtype}); load {self.load_seconds:.1f} s, {graph}, "
            f"compile + warm-up {self.warmup_seconds:.1f} s, CUDA graphs {self.decode_graph_seconds:.1f} s "
            f"(decode batch sizes {list(self.decode_graph_sizes)}); matches {counts}"
        )


def decode_bucket_sizes(configured: list[int], max_num_seqs: int) -> list[int]:
    """Configured sizes capped at the scheduler's batch limit (a larger bucket could never be used)."""
    if not configured or min(configured) < 1:
        raise ValueError(f"compile.cuda_graph_batch_sizes must be positive integers, got {configured}")
    return sorted({min(size, max_num_seqs) for size in configured})


def build_engine(
    config: FxllmConfig, model: torch.nn.Module | None = None, tokenizer: Any = None, serving: bool = False
) -> tuple[Engine, BuildInfo]:
    """Create the engine for `config` (or for an already loaded HF `model`); `serving`: behind a server."""
    load_plugins(config.compile.plugins)
    device, dtype = resolve_device_dtype(config.model.device, config.model.dtype)
    start = time.perf_counter()
    name = config.model.model
    tp_group = None
    if config.parallel.tensor_parallel_size > 1:
        from fxllm.runtime.distributed import start_tensor_parallel

        if model is not None:
            raise ValueError(
                "tensor parallelism loads the model on every rank: pass a MODEL name, not a loaded model"
            )
        tp_group = start_tensor_parallel(config, device)  # spawns ranks 1..N-1; this process is rank 0
        device = tp_group.device
        model, tokenizer = tp_group.load_model(config, dtype, tokenizer)
    elif model is None:
        from fxllm.compiler.cache import cache_root, use_cache_root
        from fxllm.models import load_model

        # Before the load: a GGUF file's parsed metadata is cached under compile.cache_dir too.
        use_cache_root(cache_root(getattr(config.compile, "cache_dir", None)))
        if device.type == "cpu":
            from fxllm.backends.cpu import native

            # Cold only (a file check otherwise): g++ runs while the model loads and is captured; the
            # lowering's first native.available() joins it (~18 s of a 122 s cold start on 2 idle cores).
            native.start_background_build()
        # Weights only (GGUF cache): the compile cache's graph runs without the HF module; build_graph makes
        # it real on a miss. Speculative drafting reads the target's modules, so it gets the real one.
        weights_only = config.speculative.method in ("none", "ngram")
        loaded = load_model(name, device=device, dtype=dtype, seed=config.model.seed,
                            num_layers=config.model.num_layers, weights_only=weights_only)  # fmt: skip
        model, tokenizer = loaded.model, loaded.tokenizer if tokenizer is None else tokenizer
        del loaded  # the graph keeps the weights it needs; merged q/k/v originals must be freed
    else:
        name = type(model).__name__ if name == "smollm2" else name
        model = model.to(device=device, dtype=dtype)
    load_seconds = time.perf_counter() - start
    hf_config = model.config
    generation_config = getattr(model, "generation_config", None)
    max_positions = int(getattr(hf_config, "max_position_embeddings", 0) or 8192)
    draft_source = drafter_source(config.speculative, model)  # self_draft: the target's first layers
    # eagle3: the graph also returns the hidden states the head reads (pass expose_hidden_states)
    config = with_hidden_state_outputs(config, hf_config)
    built = build_graph(config, model, name, device, dtype)  # capture + passes, or the compile cache's entry
    del model
    chosen = implementations_chosen(built.gm)
    if tp_group is None:
        runner = ModelRunner(built.gm, config.compile.backend, device, dtype, config.cache)
    else:
        runner = tp_group.make_runner(built.gm, config, dtype)  # every step runs on every rank
    max_model_len = min(config.model.max_model_len or max_positions, max_positions, runner.capacity_tokens)
    # Every EOS id of the generation config ends a request, as in Hugging Face's generate.
    eos_token_ids = resolve_eos_token_ids(generation_config, tokenizer, hf_config)
    scheduler_config = resolve_scheduler_limits(
        config.scheduler, device.type, runner.capacity_tokens, serving
    )
    engine = Engine(
        runner,
        tokenizer,
        scheduler_config,
        enable_prefix_caching=config.cache.enable_prefix_caching,
        max_model_len=max_model_len,
        vocab_size=int(hf_config.vocab_size),
        eos_token_ids=eos_token_ids,
    )
    drafter = build_drafter(config, engine, draft_source, tokenizer)  # draft_model / self_draft only
    build_speculator(config.speculative, engine, drafter)  # None for speculative.method=none
    logger.info("compiling the forward (%s backend): one warm-up request", config.compile.backend)
    warmup_seconds = engine.warmup()
    info = BuildInfo(name, device, dtype, load_seconds, built.capture_seconds, built.passes_seconds, built.report,
                     chosen, warmup_seconds, compile_cache=built.cache, cache_seconds=built.cache_seconds)  # fmt: skip
    if device.type == "cuda" and config.compile.cuda_graphs:
        max_seqs = engine.scheduler.config.max_num_seqs
        sizes = decode_bucket_sizes(config.compile.cuda_graph_batch_sizes, max_seqs)
        logger.info("capturing CUDA graphs for decode batch sizes %s", sizes)
        info.decode_graph_seconds = runner.enable_decode_graphs(sizes, max_model_len, capture=True)
        info.decode_graph_sizes = tuple(sizes)
    if engine.compile_settled:
        # After every compile (CUDA-graph capture compiles the bucket sizes): from here on, Dynamo
        # checks only the guards that tell compiled variants apart.
        runner.freeze_guards()
    if should_freeze(config.scheduler.gc_freeze, device.type):
        engine.freeze_heap()
    logger.info("engine ready: %s; KV capacity %d tokens", info.summary(), runner.capacity_tokens)
    return engine, info
