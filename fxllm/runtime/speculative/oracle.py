"""An oracle proposer for measuring the machinery: drafts are a known continuation of each prompt.

With the target's own greedy continuation (computed first without speculation) every draft of a greedy
request is accepted, so a benchmark sees the best case of verification (issue 16's H100 numbers); with
sampling, drafts are accepted where the sampled run still follows the continuation (the statistical test).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC

import torch

from fxllm.runtime.sequence import Sequence


class OracleProposer:
    """Drafts the next tokens of a fixed continuation while a sequence's output follows it."""

    def __init__(self, continuations: Mapping[tuple[int, ...], SequenceABC[int]]) -> None:
        """`continuations` maps a prompt's token ids to the output tokens to draft."""
        self.continuations = {tuple(k): list(v) for k, v in continuations.items()}

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Per sequence the continuation's next `limit` tokens, [] once its output left the continuation."""
        drafts = []
        for seq, limit in zip(seqs, limits):
            follow = self.continuations.get(tuple(seq.token_ids[: seq.num_prompt_tokens]), [])
            done = seq.num_output_tokens
            on_path = follow[:done] == seq.token_ids[seq.num_prompt_tokens :]
            drafts.append(follow[done : done + limit] if on_path else [])
        return drafts


# ---- a model whose greedy output is forced: the oracle follows the run's own tokens ----------------------
# Drafting the plain run's tokens fails on bf16 random weights: the top two logits are near-ties (128k ids,
# Gaussian logits), the verify step's GEMMs round differently from a decode step's, the speculative run leaves
# the plain run's path and the oracle has nothing more to draft (8 of 97 steps verified on the H100). Here the
# weights stay random where the cost is (every GEMM, attention, the KV cache: dense kernels cost the same for any
# values) but the next token is forced with a margin no rounding can flip, and the oracle computes the
# continuation from each sequence's own last token, so even a flipped token would not end the drafting.


def forced_next(token: int, vocab_size: int) -> int:
    """The token a forced-chain model predicts after `token`."""
    return (token + 1) % vocab_size


@torch.no_grad()
def force_chain_(model: torch.nn.Module, residual_scale: float = 1e-2) -> int:
    """Make an HF causal LM (random weights) predict forced_next(t) after t with a wide margin; returns the vocab.

    Each decoder layer's output projections (attention o_proj, MLP down_proj) are scaled by `residual_scale`, so
    the residual stream stays the current token's embedding e_t plus a small random part; the embedding rows are
    rescaled to unit RMS, the final norm's weight set to ones and the LM head's row forced_next(t) set to
    e_t / sqrt(hidden). The logit of forced_next(t) is then ~ sqrt(hidden) (64 on an 8B), the others ~ N(0, 1)
    (largest of 128k ~ 5): a margin of ~59 against bf16 rounding of ~0.25 at 64."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"{type(model).__name__}: force_chain_ needs an nn.Embedding and an nn.Linear LM head"
        )
    weight = embedding.weight.float()
    weight = weight / weight.pow(2).mean(dim=-1, keepdim=True).sqrt()
    embedding.weight.copy_(weight.to(embedding.weight.dtype))
    vocab, hidden = weight.shape
    # A tied LM head gets its own tensor: row j reads e_{j-1}, so after t the logit of t + 1 is |e_t|^2 / sqrt(H).
    rows = torch.roll(weight, shifts=1, dims=0) / hidden**0.5
    head.weight = torch.nn.Parameter(rows.to(head.weight.dtype), requires_grad=False)
    inner = getattr(model, "model", None)
    for layer in getattr(inner, "layers", []):
        for owner, name in (
            (getattr(layer, "self_attn", None), "o_proj"),
            (getattr(layer, "mlp", None), "down_proj"),
        ):
            linear = getattr(owner, name, None)
            if not isinstance(linear, torch.nn.Linear):
                raise ValueError(
                    f"{type(layer).__name__} has no {name}: force_chain_ supports Llama-like layers"
                )
            linear.weight.mul_(residual_scale)
    norm = getattr(inner, "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        norm.weight.fill_(1.0)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    return int(vocab)


class ChainOracle:
    """Drafts a forced-chain model's continuation of each sequence's own last token (force_chain_)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Per sequence forced_next applied `limit` times from its last token."""
        drafts = []
        for seq, limit in zip(seqs, limits):
            token, run = seq.token_ids[-1], []
            for _ in range(limit):
                token = forced_next(token, self.vocab_size)
                run.append(token)
            drafts.append(run)
        return drafts
