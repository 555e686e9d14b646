"""Rejection sampling of drafted tokens (Leviathan et al. 2023): the output follows the target's distribution.

A sequence with k drafts brings k + 1 target logits rows: row i scores the token after draft i - 1 (row 0
the token after the last accepted one). Draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
at the first rejection a token is drawn from the residual max(0, p_i - q_i) renormalised and the run
ends; when every draft is accepted a bonus token is drawn from row k. A drafter that proposes tokens
without a distribution (n-gram lookup, greedy drafting) is a point mass: q_i(d_i) = 1, so the test is
u < p_i(d_i) and the residual is p_i with d_i removed. Greedy requests (temperature ~0) accept a draft
iff it is the target's argmax and then take the argmax: exactly the tokens of plain greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fxllm.runtime.sampler import (
    _GREEDY_TEMPERATURE,
    apply_min_p,
    apply_top_k_top_p,
    sample_from_probs,
)
from fxllm.runtime.sampling_params import SamplingParams


def is_greedy(params: SamplingParams) -> bool:
    """Whether the sampler takes the argmax for these params (its own threshold)."""
    return params.temperature < _GREEDY_TEMPERATURE


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from for `params`: tempered, top-k / top-p / min-p truncated.

    `logits` is [R, V]; every row shares `params` (one sequence's verify rows). Uses the sampler's own
    truncation functions, so the verified distribution is the one plain decoding samples.
    """
    rows, vocab = logits.shape
    scaled = logits.float() / params.temperature
    top_k = vocab if params.top_k <= 0 else min(params.top_k, vocab)
    if top_k < vocab or params.top_p < 1.0:
        scaled = apply_top_k_top_p(
            scaled,
            torch.full((rows,), top_k, dtype=torch.int64, device=logits.device) if top_k < vocab else None,
            torch.full((rows,), params.top_p, dtype=torch.float32, device=logits.device)
            if params.top_p < 1.0
            else None,
        )
    if params.min_p > 0.0:
        scaled = apply_min_p(
            scaled, torch.full((rows,), params.min_p, dtype=torch.float32, device=logits.device)
        )
    return scaled.softmax(dim=-1)


def _uniform(count: int, generator: torch.Generator | None, device: torch.device) -> list[float]:
    """`count` U[0, 1) draws from the sequence's own generator (seeded requests stay reproducible)."""
    return torch.rand(count, generator=generator, device=device).tolist()


def greedy_run(best: Sequence[int], drafts: Sequence[int]) -> list[int]:
    """Greedy verification from the k + 1 rows' argmax ids: drafts while each is the argmax, then the argmax."""
    out: list[int] = []
    for i, draft in enumerate(drafts):
        if draft != best[i]:
            break
        out.append(draft)
    out.append(best[len(out)])
    return out


def verify_sequence(
    logits: torch.Tensor,
    drafts: Sequence[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    draft_probs: torch.Tensor | None = None,
) -> list[int]:
    """The tokens one sequence appends: the accepted drafts plus one corrected or bonus token.

    `logits` is [k + 1, V] (the verify rows of this sequence), `drafts` the k drafted ids, `draft_probs`
    [k, V] the drafter's distributions when it sampled (None: point-mass drafts).
    """
    k = len(drafts)
    if logits.shape[0] != k + 1:
        raise ValueError(f"a sequence with {k} drafts needs {k + 1} logits rows, got {logits.shape[0]}")
    if is_greedy(params):
        return greedy_run(logits.argmax(dim=-1).tolist(), drafts)
    probs = target_probs(logits, params)
    device = logits.device
    index = torch.tensor(list(drafts), dtype=torch.int64, device=device)
    p = probs[:k].gather(1, index[:, None]).squeeze(1).tolist() if k else []
    q = [1.0] * k if draft_probs is None else draft_probs.gather(1, index[:, None]).squeeze(1).tolist()
    u = _uniform(k, generator, device) if k else []
    for i, draft in enumerate(drafts):
        if u[i] * q[i] < p[i]:  # u < p / q without dividing by a zero q
            continue
        if draft_probs is None:
            residual = probs[i].clone()
            residual[draft] = 0.0
        else:
            residual = (probs[i] - draft_probs[i].float()).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: then rejection had probability ~0
            residual = probs[i]
        token = int(sample_from_probs(residual[None] / residual.sum(), [generator])[0])
        return [*drafts[:i], token]
    bonus = int(sample_from_probs(probs[k : k + 1], [generator])[0])
    return [*drafts, bonus]
