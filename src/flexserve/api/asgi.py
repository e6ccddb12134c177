"""Writing a response straight to ASGI ``send``, for the bare inference routes.

The inference endpoints are answered ahead of Starlette's routing and
middleware (``app.FlexServeApp``, ``api/pipeline.py``): no Request or Response
objects, the response sent as its ``http.response.start`` and
``http.response.body`` messages. The request side is ``body.receive_json``.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import Send

from flexserve.api.errors import error_parts

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream; charset=utf-8"

Headers = list[tuple[bytes, bytes]]


def encode_headers(headers: Mapping[str, str]) -> Headers:
    """ASGI's raw headers, as Starlette's responses encode them."""
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


async def send_start(send: Send, status: int, content_type: bytes, headers: Headers) -> None:
    """The status line and headers of a response whose body is sent in parts."""
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), *headers],
    })


async def send_part(send: Send, body: bytes, *, last: bool = False) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": not last})


async def send_json(send: Send, status: int, body: bytes, headers: Headers) -> None:
    """A whole JSON response."""
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", JSON), (b"content-length", b"%d" % len(body)), *headers],
    })
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: BaseException, headers: Headers) -> None:
    """Any error as OpenAI's envelope (``errors.error_parts``)."""
    status, body, extra = error_parts(exc)
    await send_json(send, status, body, [*headers, *encode_headers(extra)] if extra else headers)
