"""`/v1/completions` with echo, logprobs and max_tokens 0 (lm-evaluation-harness's local-completions), through
the official openai client against tiny-llama with a real byte-level BPE tokenizer (tests/server_fixtures.py).

The echoed prompt logprobs must equal the engine's own prompt logprobs (same float32 values: JSON carries them
exactly), which tests/test_prompt_logprobs.py checks against Hugging Face's log-softmax.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_fixtures import Served, assert_error, serve, tiny_llm

from fxllm.runtime.sampling_params import SamplingParams

TEXT = "the quick brown fox jumps over a lazy dog while seven wizards"


EXPECTED: dict[int, list] = {}  # the engine's own prompt logprobs of TEXT, by k, taken before serving


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    llm = tiny_llm()
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    EXPECTED[1] = llm.generate([TEXT], params)[0].prompt_logprobs  # type: ignore[assignment]
    with serve(llm) as s:
        yield s


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def test_echo_max_tokens_0_returns_the_prompt_logprobs(served: Served, client: openai.OpenAI) -> None:
    resp = client.completions.create(model="tiny-llama", prompt=TEXT, max_tokens=0, echo=True, logprobs=1,
                                     temperature=0)  # fmt: skip
    ids = served.llm.tokenizer(TEXT).input_ids
    expected = EXPECTED[1]
    choice = resp.choices[0]
    assert choice.text == TEXT  # the prompt, nothing generated
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    assert "".join(lp.tokens) == TEXT
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == expected[p][ids[p]].logprob
        top = lp.top_logprobs[p]
        best = max(expected[p].values(), key=lambda e: e.logprob)
        # The top-1 plus the prompt's own token when it is not the top-1 (lm-eval's is_greedy reads this).
        assert max(top.values()) == best.logprob and lp.tokens[p] in top
        assert len(top) == (1 if best.token_id == ids[p] else 2)
    assert (
        resp.usage is not None and resp.usage.completion_tokens == 0 and resp.usage.prompt_tokens == len(ids)
    )


def test_echo_with_a_completion_and_token_id_prompts(served: Served, client: openai.OpenAI) -> None:
    ids = served.llm.tokenizer(TEXT).input_ids
    plain = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=3, temperature=0, logprobs=0)
    resp = client.completions.create(model="tiny-llama", prompt=[ids, ids[:5]], max_tokens=3, temperature=0,
                                     echo=True, logprobs=0)  # fmt: skip
    first = resp.choices[0]
    assert first.text == served.llm.tokenizer.decode(ids) + plain.choices[0].text
    lp = first.logprobs
    assert lp is not None and len(lp.token_logprobs) == len(ids) + 3
    # The completion's logprobs follow the prompt's, as a non-echo request reports them (to float32 rounding:
    # the echo request batches two prompts, so its GEMMs have other shapes; ~5e-7 measured).
    assert lp.token_logprobs[len(ids) :] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset[len(ids)] == len(served.llm.tokenizer.decode(ids))
    assert len(resp.choices[1].logprobs.tokens) == 5 + 3
    # Without logprobs: the text only.
    bare = client.completions.create(model="tiny-llama", prompt=TEXT, max_tokens=2, temperature=0, echo=True)
    assert bare.choices[0].text.startswith(TEXT) and bare.choices[0].logprobs is None


def test_echo_rejections(served: Served) -> None:
    import httpx

    url = f"{served.url}/v1/completions"
    no_echo = httpx.post(url, json={"prompt": TEXT, "max_tokens": 0}, timeout=30)
    assert_error(no_echo, 400, "max_tokens")
    streamed = httpx.post(
        url, json={"prompt": TEXT, "max_tokens": 0, "echo": True, "stream": True}, timeout=30
    )
    assert_error(streamed, 400, "echo")
