"""Rejection sampling keeps the target distribution (issue 16), checked on synthetic logits.

Vocabulary 6, k = 2 drafts. For every draft kind (point mass: n-gram lookup; sampled with draft
probabilities) 2,500 verifications give the first appended token's histogram, and the second's given
the first draft was accepted; both must match the target's probabilities: total variation < 0.05 (a
correct sampler's expected TV at 2,500 draws is ~0.02) and a chi-square statistic below 20.5 (5 degrees
of freedom, p = 0.001). A sampler that accepted every draft would be off by TV ~0.5. Greedy: the argmax
run exactly.
"""

from __future__ import annotations

import pytest
import torch

from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.speculative.rejection import target_probs, verify_sequence

VOCAB, TRIALS = 6, 2_500
CHI2_LIMIT = 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def _check(counts: torch.Tensor, probs: torch.Tensor) -> None:
    total = int(counts.sum())
    empirical = counts / total
    tv = 0.5 * float((empirical - probs).abs().sum())
    chi2 = float(((counts - total * probs) ** 2 / (total * probs)).sum())
    assert tv < 0.05 and chi2 < CHI2_LIMIT, (tv, chi2, empirical.tolist(), probs.tolist())


@pytest.mark.parametrize("kind", ["point-mass", "draft-probs"])
def test_temperature_one_is_lossless(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=gen) * 1.5
    params = SamplingParams(temperature=1.0)
    p = target_probs(logits, params)
    q = torch.softmax(torch.randn(2, VOCAB, generator=gen), dim=-1)  # the drafter's own distributions
    first = torch.zeros(VOCAB)
    second = torch.zeros(VOCAB)  # the token after an accepted first draft
    draws = torch.Generator().manual_seed(1)
    rng = torch.Generator().manual_seed(2)
    sampled_drafts = torch.multinomial(q, TRIALS, replacement=True, generator=draws).T.tolist()
    for trial in range(TRIALS):
        if kind == "point-mass":
            drafts = [2, 4]  # a fixed guess, as a lookup proposer makes
            out = verify_sequence(logits, drafts, params, rng)
        else:
            drafts = sampled_drafts[trial]
            out = verify_sequence(logits, drafts, params, rng, draft_probs=q)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
            assert out[0] == drafts[0]
    _check(first, p[0])
    if kind == "point-mass":
        _check(second, p[1])  # the first draft is always token 2: row 1 is the target after it


def test_greedy_takes_the_argmax_run() -> None:
    logits = torch.full((4, VOCAB), -1.0)
    best = [3, 1, 5, 0]
    for row, token in enumerate(best):
        logits[row, token] = 2.0
    greedy = SamplingParams(temperature=0)
    assert verify_sequence(logits, [3, 1, 5], greedy, None) == [3, 1, 5, 0]  # all accepted + bonus
    assert verify_sequence(logits, [3, 2, 5], greedy, None) == [3, 1]  # the first mismatch is corrected
    assert verify_sequence(logits[:1], [], greedy, None) == [3]


def test_seeded_verification_is_reproducible() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=0.8, top_k=4)
    runs = [verify_sequence(logits, [1, 2, 3], params, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_truncation_matches_the_sampler() -> None:
    """top-k / top-p zero the same tokens the sampler masks: a draft outside them is never accepted."""
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0, -3.0]] * 2)
    params = SamplingParams(temperature=1.0, top_k=2)
    assert target_probs(logits, params)[0, 2:].sum() == 0
    for seed in range(50):
        out = verify_sequence(logits, [3], params, torch.Generator().manual_seed(seed))
        assert len(out) == 1 and out[0] in (0, 1)


def test_metrics_count_speculation() -> None:
    """/metrics carries a request's drafted and accepted tokens and its acceptance rate."""
    from fxllm.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from fxllm.serve.metrics import ServerMetrics

    metrics = RequestMetrics(0.0, 1.0, 2.0, spec_verify_steps=3, spec_draft_tokens=12, spec_accepted_tokens=6)
    assert metrics.spec_acceptance_rate == 0.5 and metrics.spec_mean_accepted_length == 3.0
    server = ServerMetrics("m")
    server.observe(RequestOutput("r", None, [1], [CompletionOutput(0, "", [5, 6], "stop")], True, metrics))
    text = server.render().decode()
    for line in ('fxllm:spec_decode_num_drafts_total{model_name="m"} 3.0',
                 'fxllm:spec_decode_num_draft_tokens_total{model_name="m"} 12.0',
                 'fxllm:spec_decode_num_accepted_tokens_total{model_name="m"} 6.0',
                 'fxllm:spec_decode_request_acceptance_rate_sum{model_name="m"} 0.5'):  # fmt: skip
        assert line in text, line
