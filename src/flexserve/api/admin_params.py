"""Query parameters of the organization admin endpoints, validated.

Each bad parameter is a 400 ``invalid_request_error`` that names it in
``param``, as OpenAI does. Arrays are taken the ways clients send them:
repeated (``group_by=model&group_by=service_tier``), with brackets
(``group_by[]=model``) or comma-separated (``group_by=model,service_tier``).

Integers are bounded where they are read (``integer``): a number past what
the database and the calendar hold (a time after the year 9999, a 64-bit
overflow) is a 400 naming the parameter, not an error deep in a query.

Pagination is by buckets: a page holds at most ``limit`` buckets and
``next_page`` is an opaque cursor for the first bucket of the next page.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass

from starlette.datastructures import QueryParams

from flexserve.errors import InvalidRequestError

BUCKET_WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
# Per bucket width: (default limit, largest limit), as OpenAI's usage API.
USAGE_LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
COST_LIMITS = {"1d": (7, 180)}
_CURSOR_PREFIX = "fsp1:"
# The last second of the year 9999 (UTC): later times fit no date type or report.
MAX_UNIX_TIME = 253_402_300_799


@dataclass(frozen=True, slots=True)
class Window:
    """The range and buckets one page of a report covers."""

    origin: int  # start_time: bucket k starts at origin + k·width
    width: int
    end: int  # end_time (exclusive)
    page_start: int  # first bucket of this page
    page_end: int  # end of this page's last bucket (exclusive, ≤ end)

    @property
    def has_more(self) -> bool:
        return self.page_end < self.end

    @property
    def next_page(self) -> str | None:
        return encode_cursor(self.page_end) if self.has_more else None

    def bucket_starts(self) -> range:
        return range(self.page_start, self.page_end, self.width)


def _invalid(message: str, param: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def one(params: QueryParams, name: str) -> str | None:
    values = params.getlist(name)
    if len(values) > 1:
        raise _invalid(f"Invalid '{name}': give it at most once.", name)
    return values[0] if values else None


def integer(
    params: QueryParams,
    name: str,
    *,
    minimum: int,
    maximum: int,
    required: bool = False,
    what: str = "It",
) -> int | None:
    """The parameter as an integer within [minimum, maximum], or a 400 naming it."""
    raw = one(params, name)
    if raw is None or raw == "":
        if required:
            raise _invalid(
                f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
            )
        return None
    try:
        value = int(raw)
    except ValueError:
        # Also a number too long to convert (Python refuses past 4300 digits).
        raise _invalid(
            f"Invalid '{name}': expected an integer, got {_shown(raw)!r}.", name, "invalid_type"
        ) from None
    if not minimum <= value <= maximum:
        raise _invalid(
            f"Invalid '{name}': {_shown(raw)} is out of range. "
            f"{what} must be between {minimum} and {maximum}.",
            name,
        )
    return value


def _shown(raw: str) -> str:
    """A parameter's value as an error message quotes it: not a page of digits."""
    return raw if len(raw) <= 40 else raw[:40] + "…"


def array(
    params: QueryParams, name: str, allowed: tuple[str, ...] | None = None
) -> tuple[str, ...]:
    values: list[str] = []
    for key in (name, f"{name}[]"):
        for raw in params.getlist(key):
            values += [part.strip() for part in raw.split(",") if part.strip()]
    if allowed is not None:
        for value in values:
            if value not in allowed:
                raise _invalid(
                    f"Invalid value for '{name}': {value!r}. Supported values are: "
                    + ", ".join(repr(a) for a in allowed)
                    + ".",
                    name,
                )
    return tuple(dict.fromkeys(values))  # without repeats, in order


def boolean(params: QueryParams, name: str) -> bool | None:
    raw = one(params, name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise _invalid(f"Invalid '{name}': expected true or false, got {raw!r}.", name, "invalid_type")


def window(params: QueryParams, limits: dict[str, tuple[int, int]]) -> Window:
    """start_time, end_time, bucket_width, limit and page, checked together."""
    start = integer(params, "start_time", minimum=0, maximum=MAX_UNIX_TIME, required=True)
    assert start is not None
    end = integer(params, "end_time", minimum=0, maximum=MAX_UNIX_TIME)
    if end is None:
        end = int(time.time()) + 1  # through the current second
    elif end <= start:
        raise _invalid("Invalid 'end_time': it must be later than 'start_time'.", "end_time")
    width_name = one(params, "bucket_width") or "1d"
    if width_name not in limits:
        raise _invalid(
            f"Invalid value for 'bucket_width': {width_name!r}. Supported values are: "
            + ", ".join(repr(w) for w in limits)
            + ".",
            "bucket_width",
        )
    default_limit, max_limit = limits[width_name]
    limit = integer(params, "limit", minimum=1, maximum=max_limit, what=f"With bucket_width={width_name}, it")
    if limit is None:
        limit = default_limit
    width = BUCKET_WIDTHS[width_name]
    page = one(params, "page")
    page_start = start if page is None else decode_cursor(page, start, end, width)
    page_end = min(end, page_start + limit * width)
    return Window(start, width, end, page_start, page_end)


def encode_cursor(bucket_start: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{bucket_start}".encode()).decode().rstrip("=")


def decode_cursor(page: str, start: int, end: int, width: int) -> int:
    """The bucket a ``next_page`` cursor points at; it must belong to this query."""
    try:
        raw = base64.urlsafe_b64decode(page + "=" * (-len(page) % 4)).decode()
        if not raw.startswith(_CURSOR_PREFIX):
            raise ValueError(raw)
        bucket_start = int(raw[len(_CURSOR_PREFIX) :])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _invalid("Invalid 'page': not a cursor this endpoint returned.", "page") from None
    if not start <= bucket_start < end or (bucket_start - start) % width:
        raise _invalid(
            "Invalid 'page': the cursor belongs to another start_time, end_time or bucket_width.",
            "page",
        )
    return bucket_start
