"""Reading a request body without ever holding more than the limit."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from flexserve.errors import InvalidRequestError, RequestTooLargeError


async def read_json(request: Request, max_bytes: int) -> Any:
    """The decoded JSON body; 413 past ``max_bytes`` (checked before reading
    when Content-Length says so, and while reading when it does not)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequestError("Invalid Content-Length header.", param=None) from None
        if size > max_bytes:
            raise _too_large(max_bytes)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise InvalidRequestError(
            "The request body is empty; expected a JSON object.", param=None, code="invalid_json"
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request ({exc.msg} at position {exc.pos}).",
            param=None,
            code="invalid_json",
        ) from exc


def _too_large(max_bytes: int) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"The request body is larger than the {max_bytes} bytes this server accepts.", param=None
    )
