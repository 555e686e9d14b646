"""Request and response models of the OpenAI-compatible API (OpenAI and vLLM field names)."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from fxllm.runtime.outputs import CompletionOutput, Logprob, RequestOutput

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


# ---------------------------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    """Token counts of requests' (cumulative) outputs."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists per generated token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One choice of a completion (or a completion chunk)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """Response (object "text_completion") and stream chunks of /v1/completions."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    """One alternative token of a chat logprobs entry."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    """The sampled token of a chat logprobs entry plus its alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """Chat logprobs: one entry per generated token."""

    content: list[ChatLogprob] | None = None


class AssistantMessage(BaseModel):
    """The generated message (non-streaming)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None


class DeltaMessage(BaseModel):
    """A streamed piece of the generated message."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a chat completion chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    """Response of /v1/chat/completions (non-streaming)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatCompletionChunk(BaseModel):
    """One SSE chunk of /v1/chat/completions."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One entry of /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fxllm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """The body of an OpenAI error."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: {"error": {...}}."""

    error: ErrorInfo


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
