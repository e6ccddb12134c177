"""The one place where errors become OpenAI's error envelope.

``error_response`` turns a FlexServeError, a Starlette HTTPException or
anything unexpected into ``{"error": {"message", "type", "param", "code"}}``
with the right status and headers. An unexpected exception is logged with its
traceback and reported as a 500 ``api_error`` that names its type, so that a
client can tell a bug from a retryable 429 without seeing internals.
"""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from flexserve.errors import FlexServeError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    404: ("invalid_request_error", "unknown_url"),
    405: ("invalid_request_error", "method_not_allowed"),
}


def error_body(exc: FlexServeError) -> bytes:
    return orjson.dumps(exc.to_dict())


def error_response(exc: BaseException) -> Response:
    if isinstance(exc, FlexServeError):
        return Response(
            error_body(exc),
            status_code=exc.status_code,
            headers=exc.headers,
            media_type="application/json",
        )
    if isinstance(exc, HTTPException):
        error_type, code = _HTTP_CODES.get(exc.status_code, ("invalid_request_error", None))
        body = {"error": {"message": str(exc.detail), "type": error_type, "param": None, "code": code}}
        return Response(
            orjson.dumps(body), status_code=exc.status_code, media_type="application/json",
            headers=dict(exc.headers or {}),
        )
    log.exception("unhandled error", exc_info=exc)
    body = {
        "error": {
            "message": f"The server had an error while processing your request ({type(exc).__name__}).",
            "type": "api_error",
            "param": None,
            "code": "internal_error",
        }
    }
    return Response(orjson.dumps(body), status_code=500, media_type="application/json")


async def handle_exception(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for every exception type."""
    return error_response(exc)
