"""Reading a request body without ever holding more than the limit.

``read_json`` reads it through Starlette's request; ``receive_json`` straight
from ASGI ``receive``, for the inference routes (``api/pipeline.py``).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from flexserve.errors import InvalidRequestError, RequestTooLargeError


async def read_json(request: Request, max_bytes: int) -> Any:
    """The decoded JSON body; 413 past ``max_bytes`` (checked before reading
    when Content-Length says so, and while reading when it does not)."""
    _check_declared_length(request.headers.get("content-length"), max_bytes)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return _decode(b"".join(chunks))


async def receive_json(receive: Receive, content_length: bytes | None, max_bytes: int) -> tuple[Any, bytes]:
    """``read_json`` from ASGI ``receive``, given the Content-Length header's
    value: the decoded body and its bytes. Raises ``ClientDisconnect`` when
    the client leaves while sending."""
    _check_declared_length(content_length, max_bytes)
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return _decode(raw), raw


def _check_declared_length(declared: str | bytes | None, max_bytes: int) -> None:
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise InvalidRequestError("Invalid Content-Length header.", param=None) from None
    if size > max_bytes:
        raise _too_large(max_bytes)


def _decode(raw: bytes) -> Any:
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
