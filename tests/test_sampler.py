"""Sampler: greedy, seeded sampling, truncation, empirical distributions, penalties, min_tokens, logprobs."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from fxllm.runtime.sampler import Sampler, SamplingRow, apply_penalties, make_generator
from fxllm.runtime.sampling_params import SamplingParams

CPU = torch.device("cpu")
EOS = 0


def row(
    params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None
) -> SamplingRow:
    return SamplingRow(params, make_generator(params.seed, CPU), prompt or [], output or [])


def random_logits(n: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax_for_any_dtype() -> None:
    logits = random_logits(16, 300)
    rows = [row(SamplingParams(temperature=0)) for _ in range(16)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()
    bf16 = logits.bfloat16()
    assert Sampler()(bf16, rows).token_ids == bf16.float().argmax(-1).tolist()


def test_greedy_rows_unaffected_by_random_rows_in_batch() -> None:
    logits = random_logits(8, 300, seed=1)
    params = [SamplingParams(temperature=0) if i % 2 else SamplingParams(temperature=1.0) for i in range(8)]
    out = Sampler()(logits, [row(p) for p in params]).token_ids
    assert out[1::2] == logits[1::2].argmax(-1).tolist()


def test_sampler_does_not_modify_logits() -> None:
    logits = random_logits(4, 50)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.3, min_tokens=2
    )
    Sampler(eos_token_id=EOS)(logits, [row(params, [1, 2], [3])] * 4)
    assert torch.equal(logits, before)


def _decode_steps(batch_of: list[SamplingRow], target: int, steps: int) -> list[int]:
    """Sample `steps` tokens for rows[target]; every step uses fresh, step-dependent logits."""
    sampler = Sampler()
    tokens = []
    for step in range(steps):
        logits = random_logits(len(batch_of), 64, seed=100 + step, scale=1.0)
        logits[target] = random_logits(1, 64, seed=1000 + step, scale=1.0)[0]
        tokens.append(sampler(logits, batch_of).token_ids[target])
    return tokens


def test_seeded_row_reproducible_across_runs_and_batches() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    torch.manual_seed(0)
    alone = _decode_steps([row(params)], target=0, steps=40)
    torch.manual_seed(0)
    again = _decode_steps([row(params)], target=0, steps=40)
    torch.manual_seed(99)  # a different global RNG state must not matter either
    others = [row(SamplingParams(temperature=1.0)), row(SamplingParams(temperature=0.5, seed=7, top_k=3))]
    batched = _decode_steps([others[0], row(params), others[1]], target=1, steps=40)
    assert alone == again == batched
    # 40 draws over 64 near-uniform tokens: a constant sequence would mean the noise is not random.
    assert len(set(alone)) > 10


def test_different_seeds_differ() -> None:
    a = _decode_steps([row(SamplingParams(seed=1))], target=0, steps=40)
    b = _decode_steps([row(SamplingParams(seed=2))], target=0, steps=40)
    # Two independent draws from ~64 roughly uniform tokens agree with probability ~1/64 per step.
    assert sum(x != y for x, y in zip(a, b)) > 20


@pytest.mark.parametrize("kwargs", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_truncation_to_one_token_equals_greedy(kwargs: dict[str, float]) -> None:
    logits = random_logits(64, 500, seed=3, scale=1.0)
    rows = [row(SamplingParams(temperature=1.5, **kwargs)) for _ in range(64)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


# Frequencies of N draws have standard deviation sqrt(p(1-p)/N) <= 0.5/sqrt(N) = 0.0025 for N = 40000,
# so a 0.012 tolerance is ~5 sigma per token: a correct sampler never trips it (the seed is fixed anyway),
# while a mistake such as a missing temperature or an off-by-one in truncation moves some
# probability by several percent.
NUM_DRAWS = 40_000
TOLERANCE = 0.012
BASE_LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def _empirical(params: SamplingParams) -> torch.Tensor:
    torch.manual_seed(0)
    logits = BASE_LOGITS.expand(NUM_DRAWS, -1)
    tokens = torch.tensor(Sampler()(logits, [row(params)] * NUM_DRAWS).token_ids)
    return torch.bincount(tokens, minlength=5).float() / NUM_DRAWS


def _softmax_over(kept: list[int], temperature: float) -> torch.Tensor:
    expected = torch.zeros(5)
    expected[kept] = torch.softmax(BASE_LOGITS[kept] / temperature, dim=0)
    return expected


@pytest.mark.parametrize(
    ("kwargs", "kept", "temperature"),
    [
        ({"temperature": 1.0}, [0, 1, 2, 3, 4], 1.0),
        ({"temperature": 0.5}, [0, 1, 2, 3, 4], 0.5),
        ({"temperature": 2.0, "top_k": 3}, [0, 1, 2], 2.0),
        # probs ~ [.57, .21, .13, .08, .03]: the smallest set with mass >= 0.7 is the top two.
        ({"temperature": 1.0, "top_p": 0.7}, [0, 1], 1.0),
        # min_p 0.2 keeps probs >= 0.2 * 0.57 = 0.114: the top three.
        ({"temperature": 1.0, "min_p": 0.2}, [0, 1, 2], 1.0),
    ],
)
def test_empirical_distribution_matches_softmax(
    kwargs: dict[str, float], kept: list[int], temperature: float
) -> None:
    freq = _empirical(SamplingParams(**kwargs))
    expected = _softmax_over(kept, temperature)
    assert (freq - expected).abs().max().item() < TOLERANCE, (freq, expected)


def test_apply_penalties_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    vocab = 5
    prompt = torch.tensor([[0, 1], [4, vocab]])  # row 1 padded with vocab
    output = torch.tensor([[1, 1, 2], [vocab, vocab, vocab]])
    out = apply_penalties(
        logits,
        prompt,
        output,
        repetition=torch.tensor([2.0, 1.0]),
        presence=torch.tensor([0.5, 0.0]),
        frequency=torch.tensor([0.25, 0.0]),
    )
    # token 0: prompt, 2 > 0 -> 2/2 = 1.0; never generated.
    # token 1: seen, -1 < 0 -> -1*2 = -2; count 2 -> -2 - 0.25*2 - 0.5 = -3.0
    # token 2: generated once, 0.5 -> 0.25; -> 0.25 - 0.25 - 0.5 = -0.5
    # tokens 3, 4: unseen, unchanged.  Row 1: every penalty neutral, unchanged.
    expected = torch.tensor([[1.0, -3.0, -0.5, -0.5, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_repetition_penalty_agrees_with_hf() -> None:
    logits = random_logits(1, 200, seed=5)
    prompt, output = [3, 17, 17, 150], [42, 3, 199]
    hf = RepetitionPenaltyLogitsProcessor(penalty=1.7)(torch.tensor([prompt + output]), logits.clone())
    params = SamplingParams(temperature=0, repetition_penalty=1.7, logprobs=0)
    out = Sampler()(logits, [row(params, prompt, output)])
    assert out.token_ids == hf.argmax(-1).tolist()
    token = out.token_ids[0]
    assert out.logprobs[0] is not None
    expected_lp = torch.log_softmax(hf, dim=-1)[0, token].item()
    assert out.logprobs[0][token].logprob == pytest.approx(expected_lp, abs=1e-5)


def test_presence_penalty_steers_greedy() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9]])
    assert Sampler()(logits, [row(SamplingParams(temperature=0), output=[1])]).token_ids == [1]
    penalised = SamplingParams(temperature=0, presence_penalty=0.2)
    assert Sampler()(logits, [row(penalised, output=[1])]).token_ids == [2]
    # Frequency scales with the count: 2 occurrences * 0.06 = 0.12 > 0.1 gap.
    freq = SamplingParams(temperature=0, frequency_penalty=0.06)
    assert Sampler()(logits, [row(freq, output=[1])]).token_ids == [1]
    assert Sampler()(logits, [row(freq, output=[1, 1])]).token_ids == [2]


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[10.0, 9.0, 8.0, 0.0]] * 4)  # EOS (0) first, stop token 1 second
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[1])
    rows = [
        row(params, output=[3, 3]),  # below min_tokens: EOS and 1 banned
        row(params, output=[3, 3, 3]),  # reached: EOS allowed
        row(SamplingParams(temperature=0, min_tokens=3, ignore_eos=True), output=[]),  # EOS is ordinary
        row(SamplingParams(temperature=0), output=[]),
    ]
    assert Sampler(eos_token_id=EOS)(logits, rows).token_ids == [2, 0, 0, 0]
    # Random sampling must also never pick a banned token.
    torch.manual_seed(0)
    hot = SamplingParams(temperature=5.0, min_tokens=1, stop_token_ids=[1])
    drawn = Sampler(eos_token_id=EOS)(logits[:1].expand(2000, -1), [row(hot)] * 2000).token_ids
    assert set(drawn) == {2, 3}


def test_logprobs_equal_log_softmax() -> None:
    logits = random_logits(3, 100, seed=8)
    params = [
        SamplingParams(temperature=0.8, logprobs=5),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logprobs=0),
    ]
    out = Sampler()(logits, [row(p) for p in params])
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None

    first = out.logprobs[0]
    assert first is not None
    top5 = expected[0].topk(5).indices.tolist()
    assert set(first) == set(top5) | {out.token_ids[0]}
    for token_id, lp in first.items():
        assert lp.token_id == token_id
        assert lp.logprob == pytest.approx(expected[0, token_id].item(), abs=1e-5)

    # logprobs=0: exactly the sampled token.
    third = out.logprobs[2]
    assert third is not None and list(third) == [out.token_ids[2]]
    assert third[out.token_ids[2]].logprob == pytest.approx(expected[2].max().item(), abs=1e-5)


def test_bad_logits_shape() -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(2, 10), [row(SamplingParams())])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 15, 16, 300, 49152])
def test_native_greedy_argmax_matches_torch(dtype: torch.dtype, vocab: int) -> None:
    """The CPU's native argmax (the all-greedy fast path) picks torch.argmax's index: the first
    maximum on ties (coarse bfloat16 values make many), a NaN as the maximum, all -inf rows -> 0."""
    from fxllm.backends.cpu.native import argmax_rows

    logits = (random_logits(6, vocab, seed=vocab) * 0.5).round().to(dtype)  # few distinct values: ties
    logits[1] = float("-inf")
    if vocab > 3:
        logits[2, vocab // 2] = float("nan")
        logits[2, vocab - 1] = float("nan")
    logits[3, vocab - 1] = 100.0  # the maximum in the scalar tail
    native = argmax_rows(logits)
    if native is None:
        pytest.skip("the native CPU kernels did not build")
    assert native.tolist() == logits.argmax(-1).tolist()
    rows = [row(SamplingParams(temperature=0)) for _ in range(6)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()
    assert argmax_rows(logits[:, ::2]) is None  # strided rows: the caller uses torch
