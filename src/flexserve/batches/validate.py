"""Every line of a batch's input file checked before anything runs.

A line is checked as the live endpoint checks a request (its own ``parse``,
the model served, the features it needs), plus what only a batch has: JSON
per line, a ``custom_id`` unique in the file, the ``url`` of the batch's
endpoint, ``POST``, no streaming. Every bad line is reported with its
number, so that a file is fixed in one pass rather than one error a retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from flexserve.api.inference import Endpoint, check_features
from flexserve.batches.store import line_request_id
from flexserve.config import Settings
from flexserve.errors import FlexServeError
from flexserve.scheduler.scheduler import Scheduler

# At most this many errors are listed on a failed batch: a file wrong on
# every one of its 50,000 lines is fixed from the first few hundred.
MAX_REPORTED_ERRORS = 1000


@dataclass(slots=True)
class Checked:
    """The outcome of validating an input file."""

    lines: list[dict[str, Any]] = field(default_factory=list)  # line, custom_id, body
    errors: list[dict[str, Any]] = field(default_factory=list)  # BatchError objects
    num_errors: int = 0
    model: str | None = None

    def error(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        self.num_errors += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers, read a line at a time."""
    with path.open("rb") as source:
        for number, raw in enumerate(source, start=1):
            text = raw.strip()
            if text:
                yield number, text


def check_file(
    path: Path, endpoint: Endpoint, scheduler: Scheduler, settings: Settings, batch_hex: str
) -> Checked:
    """Validate every line; the lines to run when there are no errors."""
    checked = Checked()
    seen: set[str] = set()
    count = 0
    for number, text in _lines(path):
        count += 1
        if count > settings.batch_max_lines:
            checked.error(
                "too_many_lines",
                f"The input file has more than the {settings.batch_max_lines} requests allowed "
                "in a batch.",
                number,
            )
            break
        _check_line(checked, number, text, seen, endpoint, scheduler, settings, batch_hex)
    if count == 0:
        checked.error("empty_file", "The input file has no requests.", None)
    return checked


def _check_line(
    checked: Checked, number: int, text: bytes, seen: set[str], endpoint: Endpoint,
    scheduler: Scheduler, settings: Settings, batch_hex: str,
) -> None:
    try:
        item = orjson.loads(text)
    except orjson.JSONDecodeError:
        checked.error("invalid_json_line", "This line is not valid JSON.", number)
        return
    if not isinstance(item, dict):
        checked.error("invalid_json_line", "Each line must be a JSON object.", number)
        return
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        checked.error("missing_custom_id", "Each line needs a non-empty string `custom_id`.",
                      number, "custom_id")
        custom_id = None
    elif custom_id in seen:
        checked.error("duplicate_custom_id",
                      f"The custom_id {custom_id!r} is used by an earlier line.", number, "custom_id")
    else:
        seen.add(custom_id)
    method = item.get("method")
    if method != "POST":
        checked.error("invalid_method", f"The method must be 'POST', not {method!r}.", number,
                      "method")
    url = item.get("url")
    if url != endpoint.path:
        checked.error(
            "mismatched_url",
            f"The url {url!r} does not match the batch's endpoint {endpoint.path!r}.",
            number, "url",
        )
    body = item.get("body")
    if not isinstance(body, dict):
        checked.error("invalid_body", "Each line needs a JSON object `body`.", number, "body")
        return
    if body.get("stream"):
        checked.error("stream_unsupported", "Streaming is not supported in a batch.", number,
                      "body.stream")
        return
    request_id = line_request_id(batch_hex, number)
    try:
        inference = endpoint.parse(body, request_id, settings)
        pool = scheduler.pool(inference.model)
        check_features(inference, pool.features, inference.model)
    except FlexServeError as exc:
        code = exc.code or "invalid_request"
        param = None if exc.param is None else f"body.{exc.param}"
        checked.error(code, exc.message, number, param)
        return
    if checked.model is None:
        checked.model = inference.model
    if custom_id is not None and checked.num_errors == 0:
        checked.lines.append({"line": number, "custom_id": custom_id, "body": body,
                              "request_id": request_id})
