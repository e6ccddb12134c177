"""A check on every request's path and query string, ahead of any route.

Neither may hold a NUL character (``%00``): no path or parameter of
FlexServe's has one, and PostgreSQL refuses one in any text it is sent, so a
value carrying it into a query (``GET /v1/files/file-%00``,
``GET /v1/files?purpose=…``) failed there with a database error, where
SQLite took it. Refused up front, it is the same clear 400 on both.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from flexserve.errors import InvalidRequestError


def nul_in_request_line(path: str, query_string: bytes) -> InvalidRequestError | None:
    """The 400 for a path (percent-decoded, as the server hands it on) or a
    query string that carries a NUL, or None."""
    if "\x00" in path:
        return InvalidRequestError(
            f"The URL path '{path.replace(chr(0), '%00')}' contains a NUL character (%00), "
            "which no path may contain.",
            param=None,
            code="invalid_value",
        )
    return nul_in_query(query_string)


def nul_in_query(query_string: bytes) -> InvalidRequestError | None:
    """The 400 for a query string with a NUL in a parameter's name or value, or None."""
    if b"%00" not in query_string:  # the only way one arrives: a request line has no raw NUL
        return None
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            shown = name.replace("\x00", "%00")
            return InvalidRequestError(
                f"Query parameter '{shown}' contains a NUL character (%00), which no "
                "parameter may contain.",
                param=shown,
                code="invalid_value",
            )
    return None
