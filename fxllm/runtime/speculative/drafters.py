"""Model drafters: a second engine (its own compiled graph, KV pool and block tables) drafts greedily.

`draft_model` builds it from `speculative.model` (a smaller model with the target's tokenizer);
`self_draft` from the target itself cut to its first `speculative.draft_layers` decoder layers, keeping
its final norm and LM head (the modules share the target's weight tensors: no checkpoint of its own),
captured and compiled by the same builder. Each step the drafter gets every drafting sequence's tokens as
a request of k greedy tokens; its prefix cache keeps all but the last partial block of the previous
step's K/V, so it recomputes at most block_size - 1 + the newly accepted tokens per sequence. Greedy
drafts are point masses for the rejection sampler. The draft engine manages its own preemption and
chunked prefill; nothing of it outlives a step but cached blocks keyed by their tokens, so it can never
disagree with the target's state.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch

from fxllm.config import FxllmConfig, SpeculativeConfig
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.sequence import Sequence

if TYPE_CHECKING:
    from fxllm.runtime.engine import Engine

logger = logging.getLogger(__name__)


class EngineDrafter:
    """Drafts with a whole Engine: each sequence's tokens go in as a prompt, k greedy tokens come out."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Per sequence up to `limits[i]` greedy tokens of the draft model (batched in the draft engine)."""
        engine = self.engine
        for i, (seq, k) in enumerate(zip(seqs, limits)):
            params = SamplingParams(max_tokens=k, temperature=0, ignore_eos=True)
            engine.add_request(list(seq.token_ids), params, f"draft-{i}")
        drafted = {out.request_id: out.outputs[0].token_ids for out in engine.run_until_done()}
        return [list(drafted.get(f"draft-{i}", [])) for i in range(len(seqs))]


def truncated_model(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """`model` (an HF causal LM) with only its first `num_layers` decoder layers; weights shared, not copied."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"speculative.method=self_draft needs an HF causal LM with model.layers; {type(model).__name__} has none"
        )
    if not 1 <= num_layers < len(layers):
        raise ValueError(
            f"speculative.draft_layers={num_layers} must be between 1 and {len(layers) - 1} "
            f"(the target has {len(layers)} layers)"
        )
    hf_config = copy.deepcopy(model.config)
    hf_config.num_hidden_layers = num_layers
    if isinstance(getattr(hf_config, "layer_types", None), list):
        hf_config.layer_types = hf_config.layer_types[:num_layers]
    # Shallow copies with their own module dicts: the target's modules stay untouched.
    new_inner = copy.copy(inner)
    new_inner._modules = dict(inner._modules)
    new_inner.layers = torch.nn.ModuleList(list(layers)[:num_layers])
    new_inner.config = hf_config
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    draft.model = new_inner
    draft.config = hf_config
    return draft


def drafter_source(config: SpeculativeConfig, model: torch.nn.Module) -> torch.nn.Module | None:
    """What the drafter needs from the loaded target before the builder frees it (self_draft: its first layers;
    eagle3: its input embedding, shared with the head)."""
    if config.method == "eagle3":
        return model.get_input_embeddings()  # type: ignore[operator,no-any-return]
    if config.method != "self_draft":
        return None
    return truncated_model(model, config.draft_layers)


def build_drafter(config: FxllmConfig, engine: Engine, source: torch.nn.Module | None, tokenizer: Any) -> Any:
    """The drafter for draft_model / self_draft (an EngineDrafter) or eagle3 (eagle3.Eagle3Proposer), None for
    none / ngram."""
    from fxllm.runtime.builder import build_engine

    spec = config.speculative
    if spec.method in ("none", "ngram"):
        return None
    if spec.method == "eagle3":
        from fxllm.runtime.speculative.eagle3 import build_eagle3_drafter

        weight = getattr(source, "weight", None)
        return build_eagle3_drafter(config, engine, weight if isinstance(weight, torch.Tensor) else None)
    if config.parallel.tensor_parallel_size > 1:
        raise ValueError(
            "speculative.method draft_model/self_draft runs with parallel.tensor_parallel_size=1 only"
        )
    draft_config = copy.deepcopy(config)
    draft_config.speculative = dataclasses.replace(spec, method="none")
    if spec.method == "draft_model":
        draft_config.model.model = spec.model  # type: ignore[assignment]
        draft_engine, _ = build_engine(draft_config)
        if draft_engine.vocab_size > engine.vocab_size:
            raise ValueError(
                f"speculative.model {spec.model} has {draft_engine.vocab_size} ids but the target {engine.vocab_size}; "
                "use a drafter with the target's tokenizer"
            )
    else:
        if source is None:
            raise ValueError("speculative.method=self_draft needs the loaded target model (drafter_source)")
        draft_engine, _ = build_engine(draft_config, model=source, tokenizer=tokenizer)
    logger.info(
        "speculative %s: draft engine ready (%d KV blocks)", spec.method, draft_engine.kv_cache.num_blocks
    )
    return EngineDrafter(draft_engine)
