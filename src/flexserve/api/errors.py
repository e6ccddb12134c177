"""The one place where errors become OpenAI's error envelope.

``error_parts`` turns a FlexServeError, a Starlette HTTPException or
anything unexpected into ``{"error": {"message", "type", "param", "code"}}``
with the right status and headers (``error_response`` makes a Starlette
response of it). An unexpected exception is logged with its traceback and
reported as a 500 ``api_error`` that names its type, so that a client can
tell a bug from a retryable 429 without seeing internals.

A database that is locked (SQLite's ``database is locked`` once its busy
timeout has passed), unreachable, or whose connection pool is exhausted is
not a bug but contention that passes: it is translated here, once for every
route, into 503 ``service_unavailable`` with ``Retry-After``
(``DATABASE_ERRORS``; the app registers them as handled exceptions, so they
are answered without a traceback).

PostgreSQL refuses text with a NUL character in it, where SQLite stores it.
The request line is checked for NULs before any route (``request_line.py``)
and the fields that are looked up or stored as sent are checked where they
are read; a NUL that still reaches PostgreSQL is the client's value, and is
answered 400, not 500.
"""

from __future__ import annotations

import logging

import orjson
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from flexserve.errors import FlexServeError, InvalidRequestError, ServiceUnavailableError

log = logging.getLogger(__name__)

# What the database raises when it is busy or away rather than when a query is
# wrong: SQLite's locks, a pool with no connection to give, a server that
# refuses or drops the connection.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    OperationalError, InterfaceError, PoolTimeoutError, ConnectionError,
)
# PostgreSQL's SQLSTATE classes for the same: connection exceptions (08),
# insufficient resources (53: too many connections), operator intervention
# (57: shutting down, starting up).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57")
# PostgreSQL's SQLSTATEs for text it cannot hold: a NUL (character not in
# repertoire), or a character its encoding cannot translate.
_UNSTORABLE_TEXT_SQLSTATES = ("22021", "22P05")
# Seconds a client is asked to wait after one: about a busy writer's transaction.
_DATABASE_RETRY_AFTER = 1.0

_HTTP_CODES = {
    404: ("invalid_request_error", "unknown_url"),
    405: ("invalid_request_error", "method_not_allowed"),
}


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is busy or away (retry later), not
    that a query was wrong."""
    if isinstance(exc, DATABASE_ERRORS):
        return True
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or _sqlstate(exc)[:2] in _UNAVAILABLE_SQLSTATES
    return False


def _sqlstate(exc: DBAPIError) -> str:
    return str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or "")


def unstorable_text(exc: BaseException) -> bool:
    """Whether ``exc`` is the database refusing a value's characters (a NUL
    sent to PostgreSQL): the request's fault, not the server's."""
    return isinstance(exc, DBAPIError) and _sqlstate(exc) in _UNSTORABLE_TEXT_SQLSTATES


def error_body(exc: FlexServeError) -> bytes:
    return orjson.dumps(exc.to_dict())


def error_parts(exc: BaseException) -> tuple[int, bytes, dict[str, str]]:
    """The status, envelope and headers that answer any error (for the bare
    ASGI route, which builds no Response)."""
    if database_unavailable(exc):
        exc = _database_busy(exc)
    elif unstorable_text(exc):
        exc = InvalidRequestError(
            "A value in this request contains a NUL character (\\u0000), which FlexServe "
            "cannot store or look up.",
            param=None,
            code="invalid_value",
        )
    if isinstance(exc, FlexServeError):
        return exc.status_code, error_body(exc), exc.headers
    if isinstance(exc, HTTPException):
        error_type, code = _HTTP_CODES.get(exc.status_code, ("invalid_request_error", None))
        body = {"error": {"message": str(exc.detail), "type": error_type, "param": None, "code": code}}
        return exc.status_code, orjson.dumps(body), dict(exc.headers or {})
    log.exception("unhandled error", exc_info=exc)
    body = {
        "error": {
            "message": f"The server had an error while processing your request ({type(exc).__name__}).",
            "type": "api_error",
            "param": None,
            "code": "internal_error",
        }
    }
    return 500, orjson.dumps(body), {}


def _database_busy(exc: BaseException) -> ServiceUnavailableError:
    # The driver's message may name tables or the file's path: logged, not shown.
    log.warning("database busy or unavailable: %s", getattr(exc, "orig", None) or exc)
    return ServiceUnavailableError(
        "The service is busy (its database is locked or unavailable); retry after the "
        "time in Retry-After.",
        retry_after=_DATABASE_RETRY_AFTER,
    )


def error_response(exc: BaseException) -> Response:
    status, body, headers = error_parts(exc)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


async def handle_exception(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for every exception type."""
    return error_response(exc)
