"""A check on every request's query string, ahead of any route.

No query parameter of FlexServe's may hold a NUL character (``%00``):
PostgreSQL refuses one in any text it is sent, so a value carrying it into
a query (``GET /v1/files?purpose=…``) failed there with a database error,
where SQLite took it. Refused up front, it is the same clear 400 on both.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from flexserve.errors import InvalidRequestError


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
