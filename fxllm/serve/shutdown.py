"""Graceful shutdown: stop admitting, let requests finish within the drain time, then end each stream that
is still running with an SSE error event and `[DONE]` (a clean close, not a truncated body)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse

from fxllm.config import FxllmConfig
from fxllm.serve.errors import OpenAIError

if TYPE_CHECKING:
    from fxllm.llm import LLM

logger = logging.getLogger(__name__)

# uvicorn's own deadline, past the drain: it cancels what is left (with tracebacks) only if cutting failed.
CUT_GRACE_S = 5.0
DONE_EVENT = "data: [DONE]\n\n"


class Drain:
    """Tracks the requests in flight; after `begin()` it refuses new ones, after `cut()` it ends the rest."""

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self.draining = False
        self._cut: asyncio.Event | None = None  # made on first use, on the serving loop
        self._streams = 0
        self._calls = 0

    def _cut_event(self) -> asyncio.Event:
        if self._cut is None:
            self._cut = asyncio.Event()
        return self._cut

    def _shutting_down(self) -> OpenAIError:
        return OpenAIError(503, f"the server is shutting down (the {self.drain_s:g} s drain ended before this "
                           "request finished); retry it", code="server_shutting_down")  # fmt: skip

    def begin(self) -> None:
        """Shutdown started: new requests get 503 from now on."""
        self.draining = True

    def cut(self) -> None:
        """The drain time is over: end every stream and request still running (one log line)."""
        logger.warning("shutdown: the %g s drain ended with %d streams and %d non-streaming requests still running; "
                       "ending them with an error", self.drain_s, self._streams, self._calls)  # fmt: skip
        self._cut_event().set()

    async def run(self, handler: Awaitable[Response]) -> Response:
        """Answer a request with `handler`: 503 while draining, 503 if the drain ends before it answers;
        a streaming response gets its events guarded by `guard`."""
        if self.draining:
            raise OpenAIError(
                503, "the server is shutting down; retry the request", code="server_shutting_down"
            )
        task = asyncio.ensure_future(handler)
        cut = asyncio.ensure_future(self._cut_event().wait())
        self._calls += 1
        try:
            await asyncio.wait({task, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._calls -= 1
            cut.cancel()
            if not task.done():  # cut, or this handler was cancelled itself
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            return self._shutting_down().response()
        response = task.result()
        if isinstance(response, StreamingResponse):
            response.body_iterator = self.guard(response.body_iterator)  # type: ignore[arg-type]
        return response

    async def guard(self, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Pass SSE events through; on cut, stop the stream (aborting its requests) and close it cleanly."""
        cut = asyncio.ensure_future(self._cut_event().wait())
        pending: asyncio.Future[Any] | None = None
        self._streams += 1
        try:
            while True:
                pending = asyncio.ensure_future(_next(events))
                await asyncio.wait({pending, cut}, return_when=asyncio.FIRST_COMPLETED)
                if cut.done():
                    yield f"data: {json.dumps(self._shutting_down().payload())}\n\n"
                    yield DONE_EVENT
                    return
                try:
                    item = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield item
        finally:
            self._streams -= 1
            cut.cancel()
            if pending is not None and not pending.done():
                pending.cancel()  # the stream's own cleanup (closing engine streams = aborting) runs now
                with suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()


async def _next(events: AsyncIterator[Any]) -> Any:
    return await anext(events)


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose shutdown drains through a Drain instead of cancelling tasks mid-response."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Refuse new requests, cut what still runs after the drain time, then let uvicorn close."""
        self.drain.begin()
        timer = asyncio.get_running_loop().call_later(self.drain.drain_s, self.drain.cut)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def serve_app(app: FastAPI, llm: LLM, config: FxllmConfig) -> None:
    """Run `app` (made by create_app) with uvicorn until SIGINT/SIGTERM, drain through app.state.drain,
    then stop the engine thread."""
    log_config = None if logging.getLogger().handlers else uvicorn.config.LOGGING_CONFIG
    server = config.server
    uv_config = uvicorn.Config(app, host=server.host, port=server.port, log_config=log_config,
                               timeout_graceful_shutdown=math.ceil(server.shutdown_drain_s + CUT_GRACE_S))  # fmt: skip
    # uvicorn re-raises the signal once drained; turn SIGTERM into KeyboardInterrupt so the engine stops cleanly.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        DrainingServer(uv_config, app.state.drain).run()
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        llm.shutdown()
        logger.info("server stopped")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
