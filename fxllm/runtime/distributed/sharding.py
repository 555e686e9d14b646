"""Load-time weight sharding for tensor parallelism: each rank keeps only its part of every split linear.

The plan is the Hugging Face model's `base_model_tp_plan` where it has one, else a structural rule by
module name (q/k/v/gate/up column-parallel, o/down row-parallel). Column-parallel linears keep the
rank's rows of the weight (output features: whole heads, since heads never split), row-parallel ones
the rank's columns (their input features); the shard pass (fxllm/passes/shard_tp.py) then adds an
all-reduce after each row-parallel linear of the captured graph. Sharding before capture is what lets
the graph come out with the rank's head counts already (Hugging Face's attention views use -1 for the
head dimension), q/k/v and gate/up merge per rank (merge_linears concatenates the local shards), and
the KV cache hold only the rank's heads.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

TP_ATTR = "fxllm_tensor_parallel"  # attribute of a sharded model holding its TensorParallelInfo

COLWISE = "colwise"
ROWWISE = "rowwise"
VOCAB = "vocab"  # the LM head split by vocabulary rows; the shard pass all-gathers its logits
# The input embedding split by vocabulary rows: each rank looks up the ids in its range (zeros elsewhere)
# and the shard pass all-reduces the rows (exactly one rank contributes each, so the sum is exact).
VOCAB_EMBEDDING = "vocab_embedding"
# Hugging Face plan styles and what they mean for a rank's weights here.
_STYLE_OF: dict[str, str] = {"colwise": COLWISE, "local_colwise": COLWISE, "rowwise": ROWWISE,
                             "local_rowwise": ROWWISE}  # fmt: skip
_REPLICATED_STYLES = (
    "replicated_with_grad_allreduce",
    "embedding_rowwise",
    "gather",
    "local",
    "sequence_parallel",
)
# The structural rule for models without a plan: the linears that open a block, and the ones that close it.
_STRUCTURAL: dict[str, str] = {"q_proj": COLWISE, "k_proj": COLWISE, "v_proj": COLWISE, "gate_proj": COLWISE,
                               "up_proj": COLWISE, "o_proj": ROWWISE, "down_proj": ROWWISE}  # fmt: skip


@dataclass(frozen=True)
class TensorParallelInfo:
    """What the shard pass and the cache key need to know of a sharded model."""

    rank: int
    size: int
    group_name: str  # the process group the all-reduces run over
    plan: dict[str, str] = field(default_factory=dict)  # module fqn -> colwise | rowwise
    source: str = "tp_plan"  # "tp_plan" (the model's) or "structural"
    fuse_allreduce_rms_norm: bool = False  # parallel.fuse_allreduce_rms_norm

    @property
    def row_parallel_weights(self) -> list[str]:
        """Fully qualified names of the row-parallel linears' weights (an all-reduce follows each)."""
        return [f"{name}.weight" for name, style in self.plan.items() if style == ROWWISE]

    @property
    def vocab_parallel_weights(self) -> list[str]:
        """The vocabulary-parallel LM head's weight, if split (an all-gather of the logits follows it)."""
        return [f"{name}.weight" for name, style in self.plan.items() if style == VOCAB]

    @property
    def vocab_parallel_embedding_weights(self) -> list[str]:
        """The vocabulary-parallel input embedding's weight, if split (masked lookup + all-reduce)."""
        return [f"{name}.weight" for name, style in self.plan.items() if style == VOCAB_EMBEDDING]

    def key_part(self) -> str:
        """The compile cache key's "parallel" part."""
        fused = ", all-reduce + norm fused" if self.fuse_allreduce_rms_norm else ""
        vocab = ", vocab-parallel LM head" if self.vocab_parallel_weights else ""
        embedding = ", vocab-parallel embedding" if self.vocab_parallel_embedding_weights else ""
        return f"rank {self.rank} of {self.size}, group {self.group_name}{fused}{vocab}{embedding}"


def _base_prefix(model: nn.Module) -> str:
    prefix = getattr(type(model), "base_model_prefix", "") or ""
    return prefix if prefix and hasattr(model, prefix) else ""


def _hf_plan(model: nn.Module) -> dict[str, str] | None:
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        return None
    prefix = _base_prefix(model)
    return {(f"{prefix}.{k}" if prefix else k): v for k, v in plan.items()}


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None, bool]:
    """(input embedding, LM head, whether they share one weight tensor)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    shared = (
        embed is not None
        and head is not None
        and getattr(embed, "weight", None) is getattr(head, "weight", 0)
    )
    return embed, head, tied or shared


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def _vocab_parallel_head(model: nn.Module, size: int) -> tuple[str | None, str]:
    """The LM head's module name if it can be split by vocabulary rows, else None; and why not."""
    _, head, tied = _embeddings(model)
    if not isinstance(head, nn.Linear):
        return None, "no linear LM head"
    if tied:  # splitting a tied head would split the embedding table with it (one tensor)
        return None, "the LM head shares its weight with the embedding"
    if head.out_features % size:
        return None, f"vocabulary {head.out_features} does not divide by {size}"
    return _module_name(model, head), ""


def _vocab_parallel_embedding(model: nn.Module, size: int) -> tuple[str | None, str]:
    """The input embedding's module name if it can be split by vocabulary rows, else None; and why not."""
    embed, _, tied = _embeddings(model)
    if type(embed) is not nn.Embedding:  # subclasses (e.g. Gemma's scaled embedding) do more than a lookup
        return None, f"the input embedding is a {type(embed).__name__}, not a plain nn.Embedding"
    if tied:
        return None, "the embedding shares its weight with the LM head"
    if embed.num_embeddings % size:
        return None, f"vocabulary {embed.num_embeddings} does not divide by {size}"
    if embed.max_norm is not None:
        return None, "the embedding renormalises its rows (max_norm)"
    return _module_name(model, embed), ""


def resolve_plan(
    model: nn.Module, *, vocab_parallel: bool = False, size: int = 1, vocab_parallel_embedding: bool = False
) -> tuple[dict[str, str], str]:
    """{module fqn: colwise | rowwise | vocab | vocab_embedding} for `model`, and where the plan came from;
    with `vocab_parallel` the LM head, with `vocab_parallel_embedding` the input embedding, is split by
    vocabulary rows over `size` ranks where it can be."""
    hf_plan = _hf_plan(model)
    plan: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if hf_plan is not None:
            style = next((s for pattern, s in hf_plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
            if style is None or style in _REPLICATED_STYLES:
                continue
            if style not in _STYLE_OF:
                raise ValueError(
                    f"tensor parallelism: {name} has tp_plan style {style!r}, which fxllm does not shard (it "
                    "splits colwise and rowwise linears; fused qkv/gate_up projections are not supported yet). "
                    "Run this model with parallel.tensor_parallel_size=1."
                )
            plan[name] = _STYLE_OF[style]
        elif name.rsplit(".", 1)[-1] in _STRUCTURAL and ".layers." in f".{name}":
            plan[name] = _STRUCTURAL[name.rsplit(".", 1)[-1]]
    if not any(s == ROWWISE for s in plan.values()):
        raise ValueError(
            f"tensor parallelism: found no linears to split in {type(model).__name__} (no tp_plan and no "
            "q/k/v/o or gate/up/down projections); run it with parallel.tensor_parallel_size=1"
        )
    if vocab_parallel and size > 1:
        head, why_not = _vocab_parallel_head(model, size)
        if head is None:
            logger.info("vocab-parallel LM head off: %s (each rank keeps the whole head)", why_not)
        else:
            plan[head] = VOCAB
    if vocab_parallel_embedding and size > 1:
        embed, why_not = _vocab_parallel_embedding(model, size)
        if embed is None:
            logger.info("vocab-parallel embedding off: %s (each rank keeps the whole table)", why_not)
        else:
            plan[embed] = VOCAB_EMBEDDING
    return plan, "tp_plan" if hf_plan is not None else "structural"


def check_divisible(config: Any, size: int) -> None:
    """Fail at load, naming the sizes, unless heads, KV heads and the MLP width divide by `size`."""
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    inter = int(getattr(config, "intermediate_size", 0) or 0)
    for what, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                        ("intermediate_size", inter)):  # fmt: skip
        if value and value % size:
            divisors = [d for d in range(1, max(heads, 1) + 1) if heads % d == 0 and kv_heads % d == 0]
            raise ValueError(
                f"parallel.tensor_parallel_size={size} does not divide the model's {what} ({value}): "
                f"attention heads are never split across ranks. Sizes that work for this model "
                f"({heads} heads, {kv_heads} KV heads): {divisors}"
            )


def shard_tensor(tensor: torch.Tensor, style: str, leaf: str, rank: int, size: int) -> torch.Tensor:
    """The rank's part of a linear's (or a vocab-parallel embedding's) `weight` or `bias` (a copy, so the
    full tensor can be freed)."""
    if style in (COLWISE, VOCAB, VOCAB_EMBEDDING):
        part = tensor.shape[0] // size
        return tensor.narrow(0, rank * part, part).clone()
    if leaf == "bias":
        # A row-parallel bias is added once: after the sum of the partial products, by rank 0 alone.
        return tensor.clone() if rank == 0 else torch.zeros_like(tensor)
    part = tensor.shape[1] // size
    return tensor.narrow(1, rank * part, part).clone()


def shard_function(plan: dict[str, str], rank: int, size: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """`fn(parameter fqn, tensor) -> the rank's part` (the tensor itself where the plan does not split it)."""

    def shard(name: str, tensor: torch.Tensor) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        style = plan.get(module)
        if style is None or leaf not in ("weight", "bias"):
            return tensor
        return shard_tensor(tensor, style, leaf, rank, size)

    return shard


@torch.no_grad()
def shard_model_(model: nn.Module, info: TensorParallelInfo) -> None:
    """Replace the split linears' parameters of a loaded `model` by the rank's parts, in place."""
    shard = shard_function(info.plan, info.rank, info.size)
    for module_name, module in model.named_modules():
        if module_name not in info.plan:
            continue
        for leaf, param in list(module.named_parameters(recurse=False)):
            part = shard(f"{module_name}.{leaf}", param.data)
            module._parameters[leaf] = nn.Parameter(part, requires_grad=False)
    setattr(model, TP_ATTR, info)


def tensor_parallel_info(model: nn.Module) -> TensorParallelInfo | None:
    """The sharding a model was loaded with (None: not sharded)."""
    info = getattr(model, TP_ATTR, None)
    return info if isinstance(info, TensorParallelInfo) else None
