"""Shared by the tensor-parallel tests: the prompts, and greedy tokens + top logprobs compared within a tolerance."""

from __future__ import annotations

from fxllm import LLM, SamplingParams

PROMPTS = [[1, 5, 9, 33, 7, 100, 12, 40, 41, 42], [1, 300, 2, 77], [1, *range(60, 100)]]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)

Outputs = tuple[list[list[int]], list[list[dict[int, float]]]]


def greedy_outputs(llm: LLM) -> Outputs:
    """Tokens and top-3 logprobs of PROMPTS under PARAMS."""
    outputs = [o.outputs[0] for o in llm.generate(PROMPTS, PARAMS)]
    logprobs = [[{t: lp.logprob for t, lp in step.items()} for step in o.logprobs or []] for o in outputs]
    return [list(o.token_ids) for o in outputs], logprobs


def assert_same(reference: Outputs, other: Outputs, tolerance: float) -> None:
    """Equal tokens, and every reference top logprob within `tolerance` in `other`."""
    assert other[0] == reference[0]
    for ref_seq, seq in zip(reference[1], other[1]):
        assert len(ref_seq) == len(seq) == PARAMS.max_tokens
        for ref_step, step in zip(ref_seq, seq):
            for token, value in ref_step.items():
                assert abs(step[token] - value) <= tolerance, (token, value, step[token])
