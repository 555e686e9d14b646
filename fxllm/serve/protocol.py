"""Request models of the OpenAI-compatible API (OpenAI and vLLM field names), the logprobs and choice builders,
and the response models of fxllm.serve.responses (re-exported: callers import this one module)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fxllm.runtime.outputs import CompletionOutput, Logprob
from fxllm.serve.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprob,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    UsageInfo,
    usage_of,
)

# Everything the API layer uses, the response models of fxllm.serve.responses included (`P.CompletionResponse`).
__all__ = [
    "LOGPROB_FLOOR",
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatLogprob",
    "ChatLogprobs",
    "ChatMessage",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "DeltaMessage",
    "ErrorInfo",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "SamplingFields",
    "StreamOptions",
    "TextPart",
    "TopLogprob",
    "UsageInfo",
    "chat_choice",
    "chat_chunk_choice",
    "chat_logprobs",
    "completion_choice",
    "completion_logprobs",
    "usage_of",
]

# Logprobs of -inf are not valid JSON; OpenAI-compatible servers send this floor instead.
LOGPROB_FLOOR = -9999.0


class _Request(BaseModel):
    """Base of request bodies: strict types, unknown fields kept (and reported) rather than failing."""

    model_config = ConfigDict(extra="allow", strict=True)

    def unknown_fields(self) -> list[str]:
        """Names of fields the API does not know (they are ignored)."""
        return sorted(self.model_extra or {})


class StreamOptions(_Request):
    """`stream_options`: include_usage adds a final chunk with token counts."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(_Request):
    """Sampling fields shared by both endpoints (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    n: int | None = 1  # null (as some clients send) means the default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _null_means_default(self) -> SamplingFields:
        """Replace nulls of fields that have defaults (OpenAI accepts `"n": null` and the like)."""
        for name in ("n", "stream", "echo", "logprobs"):
            if name in type(self).model_fields and getattr(self, name) is None:
                setattr(self, name, type(self).model_fields[name].default)
        return self

    def sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams keyword arguments this request sets (unset fields keep their defaults)."""
        kwargs: dict[str, Any] = {
            "n": self.n,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
        }
        for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        return kwargs


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Request):
    """One content part of a chat message (only text is supported)."""

    type: str
    text: str | None = None


class ChatMessage(_Request):
    """One message of a conversation."""

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text, content parts joined with newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        bad = [p.type for p in self.content if p.type != "text" or p.text is None]
        if bad:
            raise ValueError(f"content part type {bad[0]!r} is not supported; send text parts only")
        return "\n".join(p.text or "" for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None  # OpenAI's deprecated forms of tools
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template expects them (OpenAI's `developer` role is a system message)."""
        out = []
        for message in self.messages:
            role = "system" if message.role == "developer" else message.role
            entry = {"role": role, "content": message.text()}
            if message.name is not None:
                entry["name"] = message.name
            out.append(entry)
        return out


# ---------------------------------------------------------------------------------- logprobs


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def _token_text(entry: Logprob) -> str:
    return entry.decoded if entry.decoded is not None else f"token_id:{entry.token_id}"


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], num_top: int, offset: int = 0
) -> CompletionLogprobs:
    """Legacy completions logprobs for generated tokens; `offset` is the text length already sent."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        sampled = entry.get(token_id)
        text = _token_text(sampled) if sampled is not None else f"token_id:{token_id}"
        result.tokens.append(text)
        result.token_logprobs.append(_finite(sampled.logprob) if sampled is not None else None)
        ranked = sorted(entry.values(), key=lambda lp: lp.logprob, reverse=True)[: max(num_top, 1)]
        if sampled is not None and sampled not in ranked:
            ranked.append(sampled)
        result.top_logprobs.append({_token_text(lp): _finite(lp.logprob) for lp in ranked})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], num_top: int) -> ChatLogprobs:
    """Chat logprobs (`content` list) for generated tokens with `num_top` alternatives each."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        sampled = entry.get(token_id) or Logprob(token_id, float("-inf"))
        ranked = sorted(entry.values(), key=lambda lp: lp.logprob, reverse=True)[:num_top]
        content.append(
            ChatLogprob(
                token=_token_text(sampled),
                logprob=_finite(sampled.logprob),
                bytes=list(_token_text(sampled).encode()),
                top_logprobs=[
                    TopLogprob(
                        token=_token_text(lp),
                        logprob=_finite(lp.logprob),
                        bytes=list(_token_text(lp).encode()),
                    )
                    for lp in ranked
                ],
            )
        )
    return ChatLogprobs(content=content)


def completion_choice(index: int, c: CompletionOutput, text: str, tok: int, num_top: int) -> CompletionChoice:
    """A completions choice carrying `text` (all of it, or a delta) and logprobs of tokens from `tok` on."""
    logprobs = None
    if c.logprobs is not None:
        logprobs = completion_logprobs(c.token_ids[tok:], c.logprobs[tok:], num_top, len(c.text) - len(text))
    return CompletionChoice(
        index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason
    )


def _chat_logprobs_from(c: CompletionOutput, tok: int, num_top: int) -> ChatLogprobs | None:
    return None if c.logprobs is None else chat_logprobs(c.token_ids[tok:], c.logprobs[tok:], num_top)


def chat_chunk_choice(index: int, c: CompletionOutput, delta: str, tok: int, num_top: int) -> ChatChunkChoice:
    """A chat stream choice carrying `delta` and logprobs of tokens from `tok` on."""
    return ChatChunkChoice(
        index=index,
        delta=DeltaMessage(content=delta),
        logprobs=_chat_logprobs_from(c, tok, num_top),
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
    )


def chat_choice(c: CompletionOutput, num_top: int) -> ChatChoice:
    """A finished chat choice."""
    return ChatChoice(
        index=c.index,
        message=AssistantMessage(content=c.text),
        logprobs=_chat_logprobs_from(c, 0, num_top),
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
    )
