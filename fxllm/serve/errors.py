"""OpenAI-shaped errors ({"error": {message, type, param, code}}) and the server's request guards."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fxllm.serve.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          500: "server_error", 503: "server_error"}  # fmt: skip


class OpenAIError(Exception):
    """An error the server answers with OpenAI's JSON shape and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type or _TYPES.get(status, "invalid_request_error"),
                              param=param, code=code)  # fmt: skip

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(
            ErrorResponse(error=self.info).model_dump(), status_code=self.status, headers=headers
        )

    def payload(self) -> dict[str, Any]:
        """The error body, for an SSE error event."""
        return ErrorResponse(error=self.info).model_dump()


class ClientGone(Exception):
    """The client closed the connection before its request was read (normal traffic, not an error)."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """A 400 invalid_request_error."""
    return OpenAIError(400, message, param=param, code=code)


_FIELD_RE = re.compile(r"^([a-z_]+) must\b")
_BRANCH_RE = re.compile(r"str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*")


def from_value_error(exc: ValueError) -> OpenAIError:
    """Map an engine / SamplingParams ValueError to a 400 that names the field when it can."""
    message = str(exc)
    match = _FIELD_RE.match(message)
    param = match.group(1) if match else None
    if param is None and "max_tokens" in message:
        param = "max_tokens"
    elif param is None and "prompt" in message:
        param = "prompt"
    return bad_request(message, param=param)


def from_validation_error(exc: ValidationError | RequestValidationError) -> OpenAIError:
    """A 400 describing the first pydantic validation failure (param = the field's dotted path)."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")

    def path(error: Any) -> str:
        # Unions report the branch tried (e.g. messages.0.content.str); keep the field path only.
        parts = [str(p) for p in error.get("loc", ()) if p != "body"]
        return ".".join(p for p in parts if not _BRANCH_RE.fullmatch(p))

    param = path(errors[0]) or None
    messages = list(dict.fromkeys(str(e.get("msg")) for e in errors if path(e) == (param or "")))
    message = "; or ".join(messages)
    message = f"{param}: {message}" if param else message
    others = len({path(e) for e in errors} - {param or ""})
    if others:
        message += f" (and {others} more invalid field{'s' if others > 1 else ''})"
    return bad_request(message, param=param)


def api_key_guard(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency that requires `Authorization: Bearer <api_key>` (no-op when api_key is None)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(
                401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise OpenAIError(401, "incorrect API key provided", code="invalid_api_key")

    return check


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error (ours, validation, routing, unexpected) with OpenAI's JSON shape."""

    async def on_openai_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        return exc.response()

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, (ValidationError, RequestValidationError))
        return from_validation_error(exc).response()

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return OpenAIError(exc.status_code, str(exc.detail), code=code).response()

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it; the log line was written where it was noticed

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        return OpenAIError(500, f"internal server error: {type(exc).__name__}: {exc}").response()

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
