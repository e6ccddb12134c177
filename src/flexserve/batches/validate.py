"""Every line of a batch's input file checked before anything runs.

A line is checked as the live endpoint checks a request (its own ``parse``,
the model served, the features it needs), plus what only a batch has: JSON
per line, a ``custom_id`` unique in the file, the ``url`` of the batch's
endpoint, ``POST``, no streaming. Every bad line is reported with its
number, so that a file is fixed in one pass rather than one error a retry.

A valid file is read twice: once to check it (keeping only custom ids, the
batch's expected cost and its prompt prefixes), once to store its lines a chunk
at a time, so that memory does not grow with the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from flexserve.api.inference import Endpoint, Inference, check_features
from flexserve.batches.store import line_request_id
from flexserve.config import Settings
from flexserve.errors import FlexServeError
from flexserve.scheduler.scheduler import Scheduler

# At most this many errors are listed on a failed batch: a file wrong on
# every one of its 50,000 lines is fixed from the first few hundred.
MAX_REPORTED_ERRORS = 1000


# Lines whose prompts agree on their first this many bytes (as JSON) run
# together: enough to cover a shared system prompt and instructions.
PREFIX_BYTES = 512
# Validated lines are written to the database this many at a time.
CHUNK_LINES = 1000

# What a line is expected to cost, from its parsed request (``Gate.expected_cost``).
CostOf = Callable[[Inference], int]


@dataclass(slots=True)
class Checked:
    """The outcome of validating an input file: its errors, or what the
    lines need (no line is kept: a 50,000-line file is read again to store
    them, a chunk at a time)."""

    errors: list[dict[str, Any]] = field(default_factory=list)  # BatchError objects
    num_errors: int = 0
    num_lines: int = 0
    model: str | None = None
    # What the whole batch is expected to cost: what its budget hold is.
    expected_cost: int = 0
    # Lines per prompt prefix, in the order each prefix first appears.
    prefix_sizes: dict[bytes, int] = field(default_factory=dict)

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


def prefix_key(body: dict[str, Any]) -> bytes:
    """What groups lines for the prefix cache: the start of their prompt."""
    prompt = body.get("messages") or body.get("prompt") or body.get("input")
    return hashlib.blake2b(orjson.dumps(prompt)[:PREFIX_BYTES], digest_size=8).digest()


def check_file(
    path: Path, endpoint: Endpoint, scheduler: Scheduler, settings: Settings, batch_hex: str,
    cost_of: CostOf,
) -> Checked:
    """Validate every line, reporting each bad one."""
    checked = Checked()
    seen: set[str] = set()
    for number, text in _lines(path):
        checked.num_lines += 1
        if checked.num_lines > settings.batch_max_lines:
            checked.error(
                "too_many_lines",
                f"The input file has more than the {settings.batch_max_lines} requests allowed "
                "in a batch.",
                number,
            )
            break
        line = _check_line(checked, number, text, seen, endpoint, scheduler, settings, batch_hex)
        if line is not None:
            body, inference = line
            checked.expected_cost += cost_of(inference)
            key = prefix_key(body)
            checked.prefix_sizes[key] = checked.prefix_sizes.get(key, 0) + 1
    if checked.num_lines == 0:
        checked.error("empty_file", "The input file has no requests.", None)
    return checked


def line_rows(
    path: Path, endpoint: Endpoint, settings: Settings, batch_id: str, checked: Checked,
    cost_of: CostOf,
) -> Iterator[list[dict[str, Any]]]:
    """The rows of a valid file's lines, ``CHUNK_LINES`` at a time; each with
    its place in the run order (lines sharing a prefix together, in file
    order within a prefix, prefixes in the order they first appear)."""
    batch_hex = batch_id.removeprefix("batch_")
    next_place: dict[bytes, int] = {}
    place = 0
    for key, size in checked.prefix_sizes.items():
        next_place[key] = place
        place += size
    chunk: list[dict[str, Any]] = []
    for number, text in _lines(path):
        item = orjson.loads(text)
        body = item["body"]
        request_id = line_request_id(batch_hex, number)
        inference = endpoint.parse(body, request_id, settings)
        key = prefix_key(body)
        chunk.append({
            "batch_id": batch_id, "line": number, "custom_id": item["custom_id"],
            "body": orjson.dumps(body).decode(), "request_id": request_id,
            "expected_cost_pico": cost_of(inference), "run_order": next_place[key],
        })
        next_place[key] += 1
        if len(chunk) == CHUNK_LINES:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_line(
    checked: Checked, number: int, text: bytes, seen: set[str], endpoint: Endpoint,
    scheduler: Scheduler, settings: Settings, batch_hex: str,
) -> tuple[dict[str, Any], Inference] | None:
    """The line's body and parsed request, or None (its errors recorded)."""
    try:
        item = orjson.loads(text)
    except orjson.JSONDecodeError:
        checked.error("invalid_json_line", "This line is not valid JSON.", number)
        return None
    if not isinstance(item, dict):
        checked.error("invalid_json_line", "Each line must be a JSON object.", number)
        return None
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        checked.error("missing_custom_id", "Each line needs a non-empty string `custom_id`.",
                      number, "custom_id")
        custom_id = None
    elif "\x00" in custom_id:
        # The lines are stored as text, which PostgreSQL refuses with a NUL in it.
        checked.error("invalid_custom_id",
                      "The custom_id contains a NUL character (\\u0000), which a custom_id may "
                      "not contain.", number, "custom_id")
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
        return None
    if body.get("stream"):
        checked.error("stream_unsupported", "Streaming is not supported in a batch.", number,
                      "body.stream")
        return None
    request_id = line_request_id(batch_hex, number)
    try:
        inference = endpoint.parse(body, request_id, settings)
        pool = scheduler.pool(inference.model)
        check_features(inference, pool.features, inference.model)
    except FlexServeError as exc:
        code = exc.code or "invalid_request"
        param = None if exc.param is None else f"body.{exc.param}"
        checked.error(code, exc.message, number, param)
        return None
    if checked.model is None:
        checked.model = inference.model
    return body, inference
