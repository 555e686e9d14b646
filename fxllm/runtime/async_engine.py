"""The async front: the engine steps on a background thread; callers await streamed outputs."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fxllm.runtime.engine import Engine
from fxllm.runtime.outputs import RequestOutput
from fxllm.runtime.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    """Runs `Engine.step()` on one thread; requests and aborts reach it through a queue."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: deque[tuple[str, Any]] = deque()
        self._streams: dict[
            str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput | Exception]]
        ] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="fxllm-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer."""
        return self.engine.tokenizer

    def queued(self, request_id: str) -> int:
        """Outputs of a streaming request waiting for its consumer (0 for a request not streaming here)."""
        stream = self._streams.get(request_id)
        return stream[1].qsize() if stream is not None else 0

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: fail the requests in flight, not the server
                logger.exception("engine step failed; aborting the requests in flight")
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._publish(request_id, exc)
                continue
            for output in outputs:
                self._publish(output.request_id, output)

    def _drain_commands(self) -> None:
        while self._commands:
            kind, payload = self._commands.popleft()
            if kind == "add":
                try:
                    self.engine.add(payload)
                except Exception as exc:
                    self._publish(payload.request_id, exc)
            elif kind == "abort":
                output = self.engine.abort(payload)
                if output is not None:
                    self._publish(payload, output)

    def _publish(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, queue = stream
        loop.call_soon_threadsafe(queue.put_nowait, item)

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs (of `params.output_kind`) as steps produce them.

        Validation errors (ValueError) raise here, before anything is queued. If the consumer stops
        iterating (a client disconnected), the request is aborted and its KV blocks freed. A consumer
        that falls behind gets what queued up in one output: DELTA outputs folded together, otherwise
        the latest snapshot (which contains the earlier ones).
        """
        request = self.engine.build_request(prompt, params, request_id)
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
        self._commands.append(("add", request))
        self._wakeup.set()
        delta = request.params.output_kind is RequestOutputKind.DELTA
        finished = False
        pending: RequestOutput | Exception | None = None
        try:
            while True:
                item = pending if pending is not None else await queue.get()
                pending = None
                if isinstance(item, Exception):
                    raise item
                while not item.finished and not queue.empty():
                    later = queue.get_nowait()
                    if isinstance(later, Exception):
                        pending = later  # hand out what came before it first
                        break
                    if delta:
                        item.add(later)
                    else:
                        item = later
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread."""
        self._commands.append(("abort", request_id))
        self._wakeup.set()

    def shutdown(self) -> None:
        """Stop the engine thread."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)
