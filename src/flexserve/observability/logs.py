"""Structured logs: one JSON line per record, the request id in every one.

``configure`` installs one handler on the root logger (stderr), so FlexServe's
own loggers, uvicorn's and the libraries' all write the same way:

- ``json`` (the default): one object a line: ``ts`` (UTC, ISO 8601, ms),
  ``level``, ``logger``, ``msg``, ``request_id`` when the line was written
  while serving a request, the record's ``fields`` (``extra={"fields": …}``)
  and, for an exception, ``exc``.
- ``text``: ``ts level logger [request id]: msg key=value …``.

The request id comes from ``request_id_var``, set where each request is
given its id (``api.request_id``, ``api.pipeline``): anything logged in the
request's task, or in a task or timer it started, carries it. Lines written
elsewhere about a request (the scheduler's own loop) pass it as
``extra={"request_id": …}``.

``flexserve.requests`` is the request log: one line per finished request
(``requests.log_request``). Its level is set apart from ``log_level`` by
``log_requests``.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from contextvars import ContextVar
from typing import Any, Literal

LogFormat = Literal["json", "text"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "text")

# The id of the request being served in this context ("" outside any).
request_id_var: ContextVar[str] = ContextVar("flexserve_request_id", default="")

REQUESTS_LOGGER = "flexserve.requests"


class RequestIdFilter(logging.Filter):
    """Puts the context's request id on a record that does not carry one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            line["request_id"] = request_id
        for name, value in _fields(record).items():
            line.setdefault(name, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``ts level logger [request id]: msg key=value …``."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", "")
        head = f"{_timestamp(record)} {record.levelname} {record.name}"
        if request_id:
            head += f" [{request_id}]"
        text = f"{head}: {record.getMessage()}"
        fields = _fields(record)
        if fields:
            text += " " + " ".join(f"{name}={_text_value(value)}" for name, value in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _text_value(value: Any) -> str:
    text = "-" if value is None else str(value)
    return json.dumps(text) if (not text or any(c.isspace() or c in "\"=" for c in text)) else text


def configure(level: str, log_format: str, *, log_requests: bool = True) -> logging.Handler:
    """Route every logger to stderr in ``log_format``, at ``level`` (the
    request log at INFO while ``log_requests``, else off). Returns the handler."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger(REQUESTS_LOGGER).setLevel(logging.INFO if log_requests else logging.CRITICAL + 1)
    return handler
