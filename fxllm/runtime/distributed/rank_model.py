"""One rank's model: its part of every split linear, loaded or made without the whole model on the rank."""

from __future__ import annotations

import logging
from typing import Any

import torch

from fxllm.config import FxllmConfig
from fxllm.runtime.distributed.sharding import (
    TP_ATTR,
    TensorParallelInfo,
    check_divisible,
    resolve_plan,
    shard_function,
    shard_model_,
)

logger = logging.getLogger(__name__)


def load_rank_model(
    config: FxllmConfig, device: torch.device, dtype: torch.dtype, rank: int, group_name: str
) -> tuple[torch.nn.Module, Any]:
    """(model holding rank `rank`'s shards, tokenizer). Presets make each random tensor whole, keep the
    rank's part and drop the rest, so a 70B preset never sits whole on one GPU; other sources load whole
    on the CPU, are split there and moved to `device`."""
    from fxllm.models import load_model
    from fxllm.models.presets import list_presets

    size = config.parallel.tensor_parallel_size
    vocab_parallel = config.parallel.vocab_parallel_lm_head
    split_embedding = config.parallel.vocab_parallel_embedding
    name = config.model.model
    common = {"seed": config.model.seed, "num_layers": config.model.num_layers}
    if name.strip().lower() in list_presets():
        skeleton = load_model(name, device="meta", dtype=dtype, **common).model
        plan, source = resolve_plan(
            skeleton, vocab_parallel=vocab_parallel, size=size, vocab_parallel_embedding=split_embedding
        )
        check_divisible(skeleton.config, size)
        del skeleton
        loaded = load_model(
            name, device=device, dtype=dtype, shard=shard_function(plan, rank, size), **common
        )
        model, tokenizer = loaded.model, loaded.tokenizer
        info = TensorParallelInfo(
            rank, size, group_name, plan, source, config.parallel.fuse_allreduce_rms_norm
        )
        setattr(model, TP_ATTR, info)  # the weights were made as the rank's parts
    else:
        loaded = load_model(name, device="cpu", dtype=dtype, **common)
        model, tokenizer = loaded.model, loaded.tokenizer
        check_divisible(model.config, size)
        plan, source = resolve_plan(
            model, vocab_parallel=vocab_parallel, size=size, vocab_parallel_embedding=split_embedding
        )
        info = TensorParallelInfo(
            rank, size, group_name, plan, source, config.parallel.fuse_allreduce_rms_norm
        )
        shard_model_(model, info)
        model = model.to(device)
    logger.info("rank %d of %d: %d linears split (%s), %.1fM parameters on this rank", rank, size, len(plan),
                source, sum(p.numel() for p in model.parameters()) / 1e6)  # fmt: skip
    return model, tokenizer


def check_size_early(config: FxllmConfig) -> None:
    """For presets (whose config is known without loading weights): fail unless the heads divide by the size."""
    from fxllm.models.presets import list_presets, preset_config

    name = config.model.model.strip().lower()
    if name in list_presets():
        check_divisible(preset_config(name), config.parallel.tensor_parallel_size)


def explain_rank_model(config: FxllmConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Rank 0's model for `fxllm compile --explain` (no group is joined: the graph names group "0", the
    default group's name in a real run)."""
    check_size_early(config)
    model, _ = load_rank_model(config, device, dtype, 0, "0")
    info = getattr(model, TP_ATTR)
    logger.info("shard plan (%s), rank 0 of %d: %s", info.source, info.size, info.plan)
    return model
