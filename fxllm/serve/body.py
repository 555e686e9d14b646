"""Reading a request body: content type, size, client disconnects, JSON that is hostile but small."""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from fxllm.serve.errors import ClientGone, OpenAIError, bad_request, from_validation_error

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_json_body(request: Request, max_bytes: int) -> bytes:
    """The body of a JSON POST: 415 unless `application/json`, 413 past max_bytes; raises ClientGone if the
    client disconnects mid-upload. parse_json_body checks and validates it."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        # Browsers send text/plain, form and multipart bodies cross-origin without a CORS preflight.
        raise OpenAIError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}",
                          code="unsupported_media_type")  # fmt: skip
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        logger.info("client disconnected while sending a request body (%d bytes received)", size)
        raise ClientGone from None
    return b"".join(chunks)


def parse_json_body(model: type[ModelT], body: bytes, max_depth: int) -> ModelT:
    """`body` as `model`: 400 in OpenAI's shape unless a JSON object nested at most max_depth deep whose
    fields validate (strict types). CPU-bound: large bodies are parsed off the event loop."""
    check_json(body, max_depth)
    return parse_request(model, body)


def check_json(body: bytes, max_depth: int) -> Any:
    """Parse `body` (400 for invalid UTF-8 or JSON, a non-object, nesting past max_depth); returns the data."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(
            f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8"
        ) from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except ValueError as exc:  # JSONDecodeError, and integers past Python's int-conversion digit limit
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    if json_depth(data) > max_depth:
        raise _too_deep(max_depth)
    return data


def json_depth(data: Any) -> int:
    """How deep objects and arrays nest in parsed JSON (a flat object is 1); iterative, so any depth is safe."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest if isinstance(data, (dict, list)) else 0


def parse_request(model: type[ModelT], body: bytes) -> ModelT:
    """Validate a checked body as `model` (strict types); every failure is a 400 in OpenAI's shape."""
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the request body could not be read: {exc}", code="invalid_json") from None


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"the request body is larger than {max_bytes} bytes (server.max_request_bytes)",
                       code="request_too_large")  # fmt: skip


def _too_deep(max_depth: int) -> OpenAIError:
    return bad_request(f"the request body nests JSON more than {max_depth} levels deep (server.max_json_depth)",
                       code="invalid_json")  # fmt: skip
