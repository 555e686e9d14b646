"""Streaming for the OpenAI-compatible server: merging several requests' output streams and turning engine
outputs into server-sent events (one chunk per choice with news, a usage chunk if asked, `[DONE]`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from fxllm.runtime.outputs import CompletionOutput, RequestOutput
from fxllm.serve import protocol as P
from fxllm.serve.errors import OpenAIError, from_value_error

logger = logging.getLogger(__name__)


async def merge_streams(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' output streams as (prompt index, output); closing it aborts them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream) as s:  # type: ignore[type-var]
                async for out in s:
                    queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One SSE `data:` event carrying `payload` as JSON."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def sse_events(
    stream: AsyncIterator[tuple[int, RequestOutput]],
    n: int,
    options: P.StreamOptions | None,
    choice_of: Callable[[int, CompletionOutput, int], Any],
    chunk_of: Callable[[list[Any], P.UsageInfo | None], BaseModel],
    prologue: tuple[str, ...] = (),
) -> AsyncIterator[str]:
    """SSE events from DELTA outputs: one chunk per choice with news, a usage chunk if asked, [DONE].

    `choice_of(index, delta, offset)` gets the choice's new text and tokens and how many characters
    of its text were sent before.
    """
    opts = options or P.StreamOptions()
    sent_chars: dict[int, int] = {}
    finished: set[int] = set()
    prompt_tokens: dict[int, int] = {}
    completion_tokens: dict[int, int] = {}

    def usage() -> P.UsageInfo:
        prompt, completion = sum(prompt_tokens.values()), sum(completion_tokens.values())
        return P.UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    for event in prologue:
        yield event
    try:
        async with aclosing(stream) as s:  # type: ignore[type-var]
            async for i, out in s:
                prompt_tokens[i] = len(out.prompt_token_ids)
                for c in out.outputs:
                    index = i * n + c.index
                    completion_tokens[index] = completion_tokens.get(index, 0) + len(c.token_ids)
                for c in out.outputs:
                    index = i * n + c.index
                    if index in finished or not (c.text or c.finish_reason or c.logprobs):
                        continue
                    offset = sent_chars.get(index, 0)
                    sent_chars[index] = offset + len(c.text)
                    if c.finish_reason is not None:
                        finished.add(index)
                    running = usage() if opts.continuous_usage_stats else None
                    yield sse(chunk_of([choice_of(index, c, offset)], running))
    except OpenAIError as exc:
        yield sse(exc.payload())
    except ValueError as exc:
        yield sse(from_value_error(exc).payload())
    except Exception as exc:
        logger.exception("generation failed mid-stream")
        yield sse(OpenAIError(500, f"generation failed: {type(exc).__name__}: {exc}").payload())
    if opts.include_usage:
        yield sse(chunk_of([], usage()))
    yield "data: [DONE]\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A text/event-stream response of `events`, unbuffered by proxies."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
