"""Stop strings and stop_token_ids end to end: through the engine (LLM.generate) and through the server.

Each case is checked against what greedy generation without stops produced for the same prompt: the
stop string is cut out of that text (chosen to start and end inside tokens and to span three), and the
stop token is one the unstopped generation emitted. The output is the unstopped text up to the stop,
finish_reason "stop", and stop_reason the string or the id, streamed or not.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from server_fixtures import uvicorn_on_loopback

from fxllm.config import config_from_dict
from fxllm.llm import LLM
from fxllm.models import LoadedModel
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.serve.server import create_app

MODEL = "smollm2"
MAX_TOKENS = 20
PROMPT = "List the planets of the solar system:"
CHAT: list[Any] = [{"role": "user", "content": "Name three mammals."}]
FIRST_CANDIDATE = 3  # stops are taken from the unstopped output at or after this token


@dataclass
class Stops:
    """One unstopped greedy generation and the stop string / stop token cut from it."""

    token_ids: list[int]
    text: str
    stop: str  # starts inside one token, ends inside a later one, covers three
    stop_pos: int  # where `stop` first occurs in `text`
    stop_tokens: int  # the tokens generated up to and including the one that completes `stop`
    stop_id: int  # a token id the generation emits first at index `stop_id_pos`
    stop_id_pos: int
    stop_id_text: str  # the text of the tokens before it


def _decode(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _stops(tok: Any, ids: list[int]) -> Stops:
    text = _decode(tok, ids)
    ends = [len(_decode(tok, ids[:k])) for k in range(len(ids) + 1)]  # ends[k]: chars of the first k tokens
    assert ends[-1] == len(text)
    # Three consecutive tokens, the first and the third of at least two characters: start after the first
    # character of the first one, end after the first character of the third one.
    lengths = [ends[k + 1] - ends[k] for k in range(len(ids))]
    j = next(j for j in range(FIRST_CANDIDATE, len(ids) - 2) if min(lengths[j], lengths[j + 2]) >= 2)
    stop = text[ends[j] + 1 : ends[j + 2] + 1]
    pos = text.find(stop)
    needed = next(k for k in range(len(ids) + 1) if stop in _decode(tok, ids[:k]))
    assert (pos, needed) == (ends[j] + 1, j + 3), (
        "the stop string first occurs where it was cut, over 3 tokens"
    )
    m = next(m for m in range(FIRST_CANDIDATE, len(ids)) if ids[m] not in ids[:m])
    return Stops(ids, text, stop, pos, needed, ids[m], m, text[: ends[m]])


@pytest.fixture(scope="module")
def llm(smollm2: LoadedModel) -> Iterator[LLM]:
    config = config_from_dict({"compile": {"backend": "eager"}, "cache": {"cpu_kv_bytes": 64 << 20}})
    # The session's SmolLM2 (conftest.py), not a second GGUF load; the model served under its name.
    llm = LLM(copy.deepcopy(smollm2.model), config=config, tokenizer=smollm2.tokenizer)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def unstopped(llm: LLM) -> dict[str, Stops]:
    """Greedy outputs without stops (completion and chat), with the stops cut from them."""
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    raw = llm.generate([PROMPT], greedy)[0].outputs[0]
    chat = llm.chat(CHAT, greedy)[0].outputs[0]
    stops = {
        "completion": _stops(llm.tokenizer, raw.token_ids),
        "chat": _stops(llm.tokenizer, chat.token_ids),
    }
    for name, out in (("completion", raw), ("chat", chat)):
        assert out.text == stops[name].text, "the engine's text is the tokenizer's decode of its tokens"
    return stops


def _greedy(**stops: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **stops)


# ---- the engine ----------------------------------------------------------------------------------


def test_stop_string_spans_tokens(llm: LLM, unstopped: dict[str, Stops]) -> None:
    s = unstopped["completion"]
    assert len(s.stop) >= 3 and s.stop_tokens > FIRST_CANDIDATE
    out = llm.generate([PROMPT], _greedy(stop=["no such text anywhere", s.stop]))[0].outputs[0]
    assert out.text == s.text[: s.stop_pos]
    assert (out.finish_reason, out.stop_reason) == ("stop", s.stop)
    # Generation ends at the token that completes the stop string; the ids up to it are kept.
    assert out.token_ids == s.token_ids[: s.stop_tokens]


def test_stop_string_on_the_last_allowed_token(llm: LLM, unstopped: dict[str, Stops]) -> None:
    """A stop string completed by the max_tokens-th token still reports "stop" (as vLLM does), and the
    text is cut before it either way: a client must never see "length" with a truncated text."""
    s = unstopped["completion"]
    params = SamplingParams(temperature=0, max_tokens=s.stop_tokens, ignore_eos=True, stop=[s.stop])
    out = llm.generate([PROMPT], params)[0].outputs[0]
    assert out.text == s.text[: s.stop_pos]
    assert (out.finish_reason, out.stop_reason) == ("stop", s.stop)


def test_stop_string_included_on_request(llm: LLM, unstopped: dict[str, Stops]) -> None:
    s = unstopped["completion"]
    out = llm.generate([PROMPT], _greedy(stop=s.stop, include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == s.text[: s.stop_pos + len(s.stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", s.stop)


def test_stop_token_id(llm: LLM, unstopped: dict[str, Stops]) -> None:
    s = unstopped["completion"]
    out = llm.generate([PROMPT], _greedy(stop_token_ids=[s.stop_id]))[0].outputs[0]
    assert out.token_ids == s.token_ids[: s.stop_id_pos + 1]  # the stop token is generated, then nothing
    assert out.text == s.stop_id_text  # its text is not in the output
    assert (out.finish_reason, out.stop_reason) == ("stop", s.stop_id)


def test_stop_in_prompt_does_not_stop(llm: LLM, unstopped: dict[str, Stops]) -> None:
    """Only generated text is searched: a stop string that is in the prompt alone changes nothing."""
    s = unstopped["completion"]
    out = llm.generate([PROMPT], _greedy(stop=["planets of the solar"]))[0].outputs[0]
    assert "planets of the solar" not in s.text
    assert (out.token_ids, out.text, out.finish_reason) == (s.token_ids, s.text, "length")


# ---- the server ----------------------------------------------------------------------------------


@dataclass
class Served:
    """A running server over the module's LLM."""

    url: str

    def client(self) -> openai.OpenAI:
        """A sync openai client for this server."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def served(llm: LLM, unstopped: dict[str, Stops]) -> Iterator[Served]:
    """Serve the LLM on a free loopback port (after `unstopped`: the sync API is off once it serves)."""
    with uvicorn_on_loopback(create_app(llm, llm.config), name="stop-uvicorn") as url:
        yield Served(url)


def _request(
    served: Served, kind: str, stream: bool, stop: list[str] | None, extra: dict[str, Any]
) -> tuple[str, Any, Any]:
    """(text, finish_reason, stop_reason) of one greedy request, streamed chunks joined."""
    client = served.client()
    common: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "stop": stop,
                              "extra_body": {"ignore_eos": True, **extra}, "stream": stream}  # fmt: skip
    if kind == "completion":
        resp = client.completions.create(prompt=PROMPT, **common)
        if not stream:
            choice = resp.choices[0]
            return choice.text, choice.finish_reason, (choice.model_extra or {}).get("stop_reason")
        chunks = [c.choices[0] for c in resp if c.choices]
        text = "".join(c.text for c in chunks)
    else:
        resp = client.chat.completions.create(messages=CHAT, **common)
        if not stream:
            choice = resp.choices[0]
            return (
                choice.message.content or "",
                choice.finish_reason,
                (choice.model_extra or {}).get("stop_reason"),
            )
        chunks = [c.choices[0] for c in resp if c.choices]
        text = "".join(c.delta.content or "" for c in chunks)
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason is not None
    return text, chunks[-1].finish_reason, (chunks[-1].model_extra or {}).get("stop_reason")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_server_stop_string(served: Served, unstopped: dict[str, Stops], kind: str, stream: bool) -> None:
    s = unstopped[kind]
    assert _request(served, kind, stream, [s.stop], {}) == (s.text[: s.stop_pos], "stop", s.stop)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_server_stop_string_included(served: Served, unstopped: dict[str, Stops], stream: bool) -> None:
    s = unstopped["completion"]
    got = _request(served, "completion", stream, [s.stop], {"include_stop_str_in_output": True})
    assert got == (s.text[: s.stop_pos + len(s.stop)], "stop", s.stop)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_server_stop_token_id(served: Served, unstopped: dict[str, Stops], kind: str, stream: bool) -> None:
    s = unstopped[kind]
    got = _request(served, kind, stream, None, {"stop_token_ids": [s.stop_id]})
    assert got == (s.stop_id_text, "stop", s.stop_id)
