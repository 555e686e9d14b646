"""The OpenAI-compatible HTTP server: FastAPI routes over fxllm's async engine, run by uvicorn."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

import fxllm
from fxllm.config import FxllmConfig
from fxllm.runtime.outputs import CompletionOutput, RequestOutput
from fxllm.runtime.sampling_params import RequestOutputKind, SamplingParams
from fxllm.serve import protocol as P
from fxllm.serve.admission import attach_scheduler_hooks
from fxllm.serve.body import parse_json_body, read_json_body
from fxllm.serve.echo import EchoPlan
from fxllm.serve.errors import (
    OpenAIError,
    api_key_guard,
    bad_request,
    from_value_error,
    install_error_handlers,
)
from fxllm.serve.limits import RequestLimits, check_chat, client_field_names
from fxllm.serve.metrics import CONTENT_TYPE, ResponseCounter, ServerMetrics
from fxllm.serve.prompts import PromptPreparer
from fxllm.serve.shutdown import Drain, serve_app
from fxllm.serve.streaming import merge_streams, sse, sse_events, sse_response

if TYPE_CHECKING:
    from fxllm.llm import LLM

logger = logging.getLogger(__name__)

ReqT = TypeVar("ReqT", bound=P.SamplingFields)
# Bodies larger than this are parsed on the tokenizer threads, not the event loop.
PARSE_OFF_LOOP_BYTES = 64 << 10


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI responses."""

    def __init__(self, llm: LLM, config: FxllmConfig, metrics: ServerMetrics) -> None:
        self.llm, self.config, self.metrics = llm, config, metrics
        self.model_name = config.server.served_model_name or config.model.model
        self.limits = RequestLimits.from_config(config.server)
        self.prompts = PromptPreparer(llm, config.server.max_prompt_bytes)

    # ---- validation -------------------------------------------------------------------------
    async def _read(self, request: Request, model: type[ReqT]) -> ReqT:
        """The request body as `model`, checked against the limits (parsed off the loop when large)."""
        server = self.config.server
        body = await read_json_body(request, server.max_request_bytes)
        if len(body) > PARSE_OFF_LOOP_BYTES:
            req = await self.prompts.run(parse_json_body, model, body, server.max_json_depth)
        else:
            req = parse_json_body(model, body, server.max_json_depth)
        self._check(req)
        return req

    def _check(self, req: P.SamplingFields) -> None:
        if req.model is not None and req.model != self.model_name:
            raise OpenAIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")  # fmt: skip
        self.limits.check_sampling(req)
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")
        if req.unknown_fields():
            logger.warning("ignoring unknown request fields: %s", ", ".join(req.unknown_fields()))

    def _params(self, req: P.SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **req.sampling_kwargs())
        except ValueError as exc:
            raise from_value_error(exc) from None

    def _start(
        self, prompts: list[list[int]], params: SamplingParams, rid: str, stream: bool
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Validate every prompt (400 before anything runs), then stream them through the engine.

        A stream gets DELTA outputs (only what is new each step); otherwise only the final output.
        """
        params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        ids = [rid if len(prompts) == 1 else f"{rid}-{i}" for i in range(len(prompts))]
        try:
            for prompt, request_id in zip(prompts, ids):
                self.llm.engine.build_request(prompt, params, request_id)  # validation only: no engine state
        except ValueError as exc:
            raise from_value_error(exc) from None
        engine = self.llm.async_engine()
        return merge_streams([self._observed(engine.generate(p, params, i)) for p, i in zip(prompts, ids)])

    async def _observed(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass the outputs on; when the stream ends, record the request's totals (deltas folded up)."""
        total: RequestOutput | None = None
        try:
            async with aclosing(stream) as s:  # type: ignore[type-var]
                async for out in s:
                    if total is None:
                        total = RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, [], False)
                    total.add(out)  # copies: `out` goes on to the client unchanged
                    yield out
        finally:
            if total is not None:
                self.metrics.observe(total)

    async def _collect(
        self, request: Request, stream: AsyncIterator[tuple[int, RequestOutput]], count: int
    ) -> list[RequestOutput] | None:
        """Final outputs per prompt; None (and the requests aborted) if the client went away."""
        finals: list[RequestOutput | None] = [None] * count

        async def run() -> None:
            async with aclosing(stream) as s:  # type: ignore[type-var]
                async for i, out in s:
                    finals[i] = out

        task = asyncio.create_task(run())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return [f for f in finals if f is not None]
                if await request.is_disconnected():
                    logger.info("client disconnected; request aborted")
                    return None
        finally:  # also when this handler is cancelled (shutdown): closing the streams aborts the requests
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task

    # ---- /v1/completions -------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        req = await self._read(request, P.CompletionRequest)
        unsupported = {"suffix": req.suffix, "best_of": req.best_of not in (None, req.n)}
        for name, value in unsupported.items():
            if value:
                raise bad_request(f"{name} is not supported", param=name)
        echo = EchoPlan.of(req)  # echo: true returns the prompt (and its logprobs) first; serve/echo.py
        params = echo.params(self._params(req, echo.max_tokens, req.logprobs), req.logprobs)
        single = isinstance(req.prompt, str) or (bool(req.prompt) and isinstance(req.prompt[0], int))
        self.limits.check_sequences(1 if single else len(req.prompt), params.n)
        prompts = await self.prompts.completion_prompts(req.prompt, params)
        rid, created, num_top = f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.logprobs or 0
        stream = self._start(prompts, params, rid, req.stream)

        def choice_of(index: int, c: CompletionOutput, offset: int) -> P.CompletionChoice:
            # `offset`: characters of this choice sent before, so text_offset counts from the start.
            logprobs = None
            if c.logprobs is not None:
                logprobs = P.completion_logprobs(c.token_ids, c.logprobs, num_top, offset)
            return P.CompletionChoice(index=index, text=c.text, logprobs=logprobs,
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason)  # fmt: skip

        def chunk_of(choices: list[Any], usage: P.UsageInfo | None) -> P.CompletionResponse:
            return P.CompletionResponse(
                id=rid, created=created, model=self.model_name, choices=choices, usage=usage
            )

        if req.stream:
            return sse_response(sse_events(stream, params.n, req.stream_options, choice_of, chunk_of))
        finals = await self._collect(request, stream, len(prompts))
        if finals is None:
            return Response(status_code=499)
        if echo.enabled:
            texts = [req.prompt] if single else list(req.prompt)
            choices = [echo.choice(i * params.n + c.index, out, c, num_top, self.llm.tokenizer, texts[i])
                       for i, out in enumerate(finals) for c in out.outputs]  # fmt: skip
            return JSONResponse(chunk_of(choices, echo.usage(finals)).model_dump())
        choices = [
            choice_of(i * params.n + c.index, c, 0) for i, out in enumerate(finals) for c in out.outputs
        ]
        return JSONResponse(chunk_of(choices, P.usage_of(finals)).model_dump())

    # ---- /v1/chat/completions --------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        req = await self._read(request, P.ChatCompletionRequest)
        check_chat(req)
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("response_format other than text is not supported", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        num_top = req.top_logprobs or 0
        # Errors name the fields the client sent: SamplingParams.logprobs is top_logprobs here.
        aliases = {"logprobs": "top_logprobs"}
        if req.max_completion_tokens is not None:
            aliases["max_tokens"] = "max_completion_tokens"
        try:
            conversation = req.conversation()
        except ValueError as exc:
            raise bad_request(str(exc), param="messages") from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        with client_field_names(aliases):
            params = self._params(req, max_tokens, num_top if req.logprobs else None)
            self.limits.check_sequences(1, params.n)
            prompt = await self.prompts.chat_prompt(conversation, params)
            stream = self._start([prompt], params, rid, req.stream)

        def choice_of(index: int, c: CompletionOutput, offset: int) -> P.ChatChunkChoice:
            return P.chat_chunk_choice(index, c, c.text, 0, num_top)

        def chunk_of(choices: list[Any], usage: P.UsageInfo | None) -> P.ChatCompletionChunk:
            return P.ChatCompletionChunk(
                id=rid, created=created, model=self.model_name, choices=choices, usage=usage
            )

        if req.stream:
            role = P.DeltaMessage(role="assistant", content="")
            prologue = tuple(
                sse(chunk_of([P.ChatChunkChoice(index=i, delta=role)], None)) for i in range(params.n)
            )
            return sse_response(
                sse_events(stream, params.n, req.stream_options, choice_of, chunk_of, prologue)
            )
        finals = await self._collect(request, stream, 1)
        if finals is None:
            return Response(status_code=499)
        choices = [P.chat_choice(c, num_top) for c in finals[0].outputs]
        resp = P.ChatCompletionResponse(
            id=rid, created=created, model=self.model_name, choices=choices, usage=P.usage_of(finals)
        )
        return JSONResponse(resp.model_dump())

    def model_card(self) -> P.ModelCard:
        """This server's one model."""
        return P.ModelCard(
            id=self.model_name, root=self.config.model.model, max_model_len=self.llm.engine.max_model_len
        )


def create_app(llm: LLM, config: FxllmConfig) -> FastAPI:
    """The FastAPI app serving `llm` with OpenAI's API (its engine thread starts with the app)."""
    metrics = ServerMetrics(config.server.served_model_name or config.model.model)
    serving = OpenAIServing(llm, config, metrics)
    drain = Drain(config.server.shutdown_drain_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        llm.async_engine()
        detach = attach_scheduler_hooks(llm.engine, metrics)
        try:
            yield
        finally:
            detach()
            serving.prompts.close()

    # No CORS middleware: a browser page on another origin cannot read responses, and the JSON-only
    # POST endpoints need a preflight that nothing here answers.
    app = FastAPI(title="fxllm", version=fxllm.__version__, lifespan=lifespan)
    app.state.serving = serving
    app.state.drain = drain
    install_error_handlers(app)
    app.add_middleware(ResponseCounter, metrics=metrics)
    guarded = [Depends(api_key_guard(config.server.api_key))]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": fxllm.__version__}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.update_engine_gauges(llm.engine)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=guarded)
    async def list_models() -> dict[str, Any]:
        return P.ModelList(data=[serving.model_card()]).model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != serving.model_name:
            raise OpenAIError(
                404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"
            )
        return serving.model_card().model_dump()

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Response:
        return await drain.run(serving.completions(request))

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Response:
        return await drain.run(serving.chat(request))

    return app


def run_server(llm: LLM, config: FxllmConfig) -> None:
    """Serve until SIGINT/SIGTERM: stop accepting, let requests finish for server.shutdown_drain_s, end the
    streams still running with an SSE error event, then stop the engine (see fxllm.serve.shutdown)."""
    from fxllm.serve.serve_cli import log_startup

    app = create_app(llm, config)
    log_startup(llm, config)
    serve_app(app, llm, config)


def serve_main(argv: list[str] | None = None) -> int:
    """`fxllm serve` / `python -m fxllm.serve`: parse arguments, build the LLM, serve (see serve_cli)."""
    from fxllm.serve.serve_cli import serve_main as main

    return main(argv)
