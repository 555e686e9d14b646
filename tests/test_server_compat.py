"""Issue 12, item 7: OpenAI compatibility of the chat and completions fields."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from server_fixtures import MODEL, Served, assert_error, serve, tiny_llm

USER = {"role": "user", "content": "the quick brown fox"}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """tiny-llama with the toy tokenizer's chat template."""
    with serve(tiny_llm()) as s:
        yield s


def _chat(served: Served, **fields: Any) -> httpx.Response:
    return httpx.post(f"{served.url}/v1/chat/completions", json={"messages": [USER], "max_tokens": 2, **fields},
                      timeout=60)  # fmt: skip


def test_developer_role_is_a_system_message(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    answers = {}
    for role in ("developer", "system"):
        out = client.chat.completions.create(model=MODEL, messages=[{"role": role, "content": "be brief"}, USER],
                                             max_tokens=4, temperature=0)  # type: ignore[list-item]  # fmt: skip
        assert out.usage is not None
        answers[role] = (out.choices[0].message.content, out.usage.prompt_tokens)
    assert answers["developer"] == answers["system"]


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "system", "content": None}])  # fmt: skip
def test_message_without_content_is_refused(served: Served, message: dict[str, Any]) -> None:
    error = assert_error(_chat(served, messages=[message]), 400, "messages.0.content")
    assert "must have content" in error["message"]
    assistant = {"role": "assistant", "content": None}  # an assistant turn may be empty
    assert _chat(served, messages=[USER, assistant, USER]).status_code == 200


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("tools", {"tools": [TOOL]}, "tools"),
    ("tool_choice", {"tool_choice": "auto"}, "tool_choice"),
    ("tool_choice_named", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("functions", {"functions": [TOOL["function"]]}, "functions"),
    ("temperature_past_2", {"temperature": 2.5}, "temperature"),
    ("stream_options_without_stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("top_logprobs_past_20", {"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    ("max_completion_tokens_zero", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("max_completion_tokens_past_context", {"max_completion_tokens": 100_000}, "max_completion_tokens"),
    ("seed_past_int64", {"seed": 2**64}, "seed"),
    ("seed_below_int64", {"seed": -(2**63) - 1}, "seed"),
]


@pytest.mark.parametrize(("fields", "param"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_with_the_field_the_client_sent(served: Served, fields: dict[str, Any], param: str) -> None:
    error = assert_error(_chat(served, **fields), 400, param)
    assert param in error["message"], error
    internal = {"top_logprobs": "logprobs", "max_completion_tokens": "max_tokens"}.get(param)
    if internal is not None:  # the internal name is not mentioned on its own
        assert not re.search(rf"(?<!\w){internal}\b", error["message"]), error


def test_completions_limits_use_the_same_rules(served: Served) -> None:
    url = f"{served.url}/v1/completions"
    assert_error(httpx.post(url, json={"prompt": "the fox", "temperature": 2.01}), 400, "temperature")
    assert_error(httpx.post(url, json={"prompt": "the fox", "stream_options": {"include_usage": True}}), 400,
                 "stream_options")  # fmt: skip
    assert_error(httpx.post(url, json={"prompt": "the fox", "seed": 2**64}), 400, "seed")


def test_accepted_edges(served: Served) -> None:
    for fields in ({"temperature": 2}, {"seed": 2**63 - 1, "n": 2, "temperature": 1}, {"seed": -(2**63)},
                   {"tool_choice": "none"}, {"tools": []}, {"stream": False, "stream_options": None}):  # fmt: skip
        resp = _chat(served, **fields)
        assert resp.status_code == 200, (fields, resp.text)
