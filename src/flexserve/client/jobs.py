"""The lines of a job, read from what users have at hand.

- **OpenAI's batch input** (JSONL; each line ``custom_id``, ``method``,
  ``url``, ``body``): sent as it is.
- **Prompts**: a text file (one prompt per line), a CSV file (``column``,
  default ``prompt``) or JSONL objects (``column``), each made into a chat
  completion for ``model`` through ``template`` (``{prompt}`` and, from CSV
  or JSONL, any other column by name). Their ``custom_id`` is
  ``line-N`` (N: the prompt's number, from 1), so a rerun matches them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Paths of OpenAI's batch input ("/v1/…"), as the SDK posts them (without "/v1").
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


class JobError(ValueError):
    """The input cannot be read as a job (the message names the line and why)."""


@dataclass(frozen=True)
class Line:
    """One request of a job."""

    custom_id: str
    url: str
    body: dict[str, Any]

    @property
    def path(self) -> str:
        """The path the SDK posts to (its base URL ends in /v1)."""
        return self.url.removeprefix("/v1")


@dataclass(frozen=True)
class PromptFormat:
    """How to make requests of plain prompts."""

    model: str | None = None
    template: str = "{prompt}"
    column: str = "prompt"
    max_tokens: int | None = None
    system: str | None = None


def read_lines(path: Path, prompts: PromptFormat) -> list[Line]:
    """Every line of the job in ``path``; the format is told by the content:
    JSON objects with ``custom_id`` and ``body`` are batch input."""
    lines: list[Line] = []
    seen: set[str] = set()
    for line in _parse(path, prompts):
        if line.custom_id in seen:
            raise JobError(f"{path}: custom_id {line.custom_id!r} appears twice; each must be unique")
        seen.add(line.custom_id)
        lines.append(line)
    return lines


def _parse(path: Path, prompts: PromptFormat) -> Iterator[Line]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"cannot read {path}: {exc}") from exc
    if path.suffix.lower() == ".csv":
        rows = csv.DictReader(text.splitlines())
        for number, row in enumerate(rows, start=1):
            yield _prompt_line(path, number + 1, number, row, prompts)
        return
    records = [(n, raw) for n, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    if not records:
        return
    first = records[0][1].lstrip()
    if not first.startswith("{"):
        for number, (n, raw) in enumerate(records, start=1):
            yield _prompt_line(path, n, number, {"prompt": raw}, prompts)
        return
    for number, (n, raw) in enumerate(records, start=1):
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise JobError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise JobError(f"{path}:{n}: expected a JSON object")
        if "body" in record or "custom_id" in record:
            yield _batch_line(path, n, record)
        else:
            yield _prompt_line(path, n, number, record, prompts)


def _batch_line(path: Path, n: int, record: Mapping[str, Any]) -> Line:
    custom_id, url, body = record.get("custom_id"), record.get("url"), record.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise JobError(f"{path}:{n}: 'custom_id' must be a non-empty string")
    if record.get("method", "POST") != "POST":
        raise JobError(f"{path}:{n}: 'method' must be POST")
    if url not in ENDPOINTS:
        raise JobError(f"{path}:{n}: 'url' must be one of {', '.join(ENDPOINTS)}, not {url!r}")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise JobError(f"{path}:{n}: 'body' must be an object with a 'model'")
    return Line(custom_id, url, dict(body))


def _prompt_line(path: Path, n: int, number: int, row: Mapping[str, Any],
                 prompts: PromptFormat) -> Line:
    if prompts.model is None:
        raise JobError(f"{path}: plain prompts need --model (batch input lines name their own)")
    fields = {str(k): v for k, v in row.items()}
    if prompts.column not in fields:
        raise JobError(f"{path}:{n}: no column {prompts.column!r} (give --column)")
    fields["prompt"] = fields[prompts.column]
    try:
        content = prompts.template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise JobError(f"{path}:{n}: the template cannot be filled: {exc!r}") from exc
    messages = [{"role": "system", "content": prompts.system}] if prompts.system else []
    messages.append({"role": "user", "content": content})
    body: dict[str, Any] = {"model": prompts.model, "messages": messages}
    if prompts.max_tokens is not None:
        body["max_tokens"] = prompts.max_tokens
    return Line(f"line-{number}", "/v1/chat/completions", body)
