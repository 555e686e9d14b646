"""SamplingParams(prompt_logprobs=k): per prompt token its logprob and the top-k, as vLLM returns them.

Compared with log_softmax of Hugging Face's float32 logits for the same prompt: within 1e-4 absolute (the
paged graph computes the same float32 operations in another order, ~1e-6 measured), top-k ids equal.
Chunked prefill fills the list chunk by chunk; a prompt whose prefix is in the prefix cache is computed in
full (its logits are needed at every position), as vLLM does.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.runtime.sampling_params import SamplingParams

TOP_K = 3
ATOL = 1e-4
_gen = torch.Generator().manual_seed(5)
PROMPT = torch.randint(3, 512, (45,), generator=_gen).tolist()
OTHER = torch.randint(3, 512, (12,), generator=_gen).tolist()


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return load_model("tiny-llama").model


@pytest.fixture(scope="module")
def hf_logprobs(tiny: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        logits = tiny(torch.tensor([PROMPT])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row p predicts token p + 1


def _llm(model: torch.nn.Module, *overrides: str) -> LLM:
    config = load_config(None, ["compile.backend=eager", "cache.block_size=16", *overrides])
    return LLM(copy.deepcopy(model), config=config)


def _check(prompt_logprobs: list | None, expected: torch.Tensor) -> None:
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(PROMPT)
    assert prompt_logprobs[0] is None
    for p in range(1, len(PROMPT)):
        entry, row = prompt_logprobs[p], expected[p - 1]
        token = PROMPT[p]
        assert abs(entry[token].logprob - float(row[token])) <= ATOL, p
        top = row.topk(TOP_K).indices.tolist()
        assert set(entry) == {token, *top}, p  # the prompt's own token first, then the top-k
        assert next(iter(entry)) == token
        for t in top:
            assert abs(entry[t].logprob - float(row[t])) <= ATOL


@pytest.mark.parametrize("chunked", [False, True])
def test_prompt_logprobs_equal_hf_log_softmax(
    tiny: torch.nn.Module, hf_logprobs: torch.Tensor, chunked: bool
) -> None:
    overrides = ["scheduler.max_num_batched_tokens=8"] if chunked else []
    llm = _llm(tiny, *overrides)
    steps = llm.engine.stats.num_steps
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=TOP_K)
    # With another request in the same steps: its sampled rows and the prompt rows must not mix.
    plain = SamplingParams(max_tokens=4, temperature=0)
    alone = _llm(tiny).generate([OTHER], plain)[0].outputs[0].token_ids
    outs = llm.generate([PROMPT, OTHER], [params, plain])
    _check(outs[0].prompt_logprobs, hf_logprobs)
    assert outs[1].prompt_logprobs is None and outs[1].outputs[0].token_ids == alone
    # The generated tokens are HF's greedy continuation's first token at least (logits of the last position).
    assert outs[0].outputs[0].token_ids[0] == int(hf_logprobs[-1].argmax())
    if chunked:
        assert llm.engine.stats.num_steps - steps >= len(PROMPT) // 8


def test_prompt_logprobs_skip_the_prefix_cache(tiny: torch.nn.Module, hf_logprobs: torch.Tensor) -> None:
    llm = _llm(tiny)
    plain = SamplingParams(max_tokens=2, temperature=0)
    llm.generate([PROMPT], plain)  # its full blocks are now in the prefix cache
    again = llm.generate([PROMPT], plain)[0]
    assert again.metrics is not None and again.metrics.num_cached_tokens == 32
    out = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0))[0]
    assert out.metrics is not None and out.metrics.num_cached_tokens == 0  # recomputed in full
    assert out.prompt_logprobs is not None
    for p in range(1, len(PROMPT)):
        assert set(out.prompt_logprobs[p]) == {PROMPT[p]}  # k = 0: the prompt's own token only
        assert abs(out.prompt_logprobs[p][PROMPT[p]].logprob - float(hf_logprobs[p - 1, PROMPT[p]])) <= ATOL


def test_prompt_logprobs_validation() -> None:
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
