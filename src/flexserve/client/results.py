"""Where a job's answers go: OpenAI's batch output format, safe to resume.

The output holds one line per answered request, the error file one per
request that failed for good, each as OpenAI's batch output lines
(``id``, ``custom_id``, ``response`` with ``status_code``, ``request_id``
and ``body``, ``error``). Each line is appended with a single ``write`` as
soon as its request ends, so a runner killed at any moment loses only the
requests in flight. Opening the files again (a rerun) drops a torn last
line (a write cut short by the kill), and reports which ``custom_id``s are
already there: a rerun skips them and never writes one twice.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flexserve.client.calls import Outcome
from flexserve.client.jobs import Line


def errors_path_for(output: Path) -> Path:
    """The error file beside ``output``: ``out.jsonl`` → ``out.errors.jsonl``."""
    return output.with_name(output.stem + ".errors" + (output.suffix or ".jsonl"))


class ResultFile:
    """One append-only JSONL file of results, keyed by ``custom_id``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: set[str] = set()
        self.torn = 0
        self._fd: int | None = None

    def open(self) -> None:
        """Read what is there (dropping a torn last line), then open for appending."""
        if self.path.exists():
            self._recover()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _recover(self) -> None:
        data = self.path.read_bytes()
        keep = 0
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if isinstance(record, dict) and isinstance(record.get("custom_id"), str):
                self.ids.add(record["custom_id"])
            keep += len(raw)
        if keep < len(data):
            self.torn = 1
            with open(self.path, "r+b") as file:
                file.truncate(keep)

    def forget(self, ids: set[str]) -> None:
        """Rewrite the file without the lines of ``ids`` (to try them again)."""
        if not ids & self.ids or not self.path.exists():
            return
        kept = [raw for raw in self.path.read_bytes().splitlines(keepends=True)
                if json.loads(raw).get("custom_id") not in ids]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(b"".join(kept))
        os.replace(temporary, self.path)
        self.ids -= ids

    def append(self, record: Mapping[str, Any]) -> bool:
        """Write one line; False (nothing written) if its ``custom_id`` is there already."""
        custom_id = record["custom_id"]
        if custom_id in self.ids or self._fd is None:
            return False
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.ids.add(custom_id)
        return True

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.fsync(fd)
            os.close(fd)


class JobFiles:
    """A job's output and error files, as a run opens them."""

    def __init__(self, output: Path) -> None:
        self.results = ResultFile(output)
        self.errors = ResultFile(errors_path_for(output))

    def open(self, *, retry_errors: bool) -> None:
        """Open both; with ``retry_errors``, drop the error file's lines first."""
        self.results.open()
        self.errors.open()
        if retry_errors:
            self.errors.forget(set(self.errors.ids))

    def todo(self, lines: Sequence[Line]) -> list[Line]:
        """The lines neither file holds yet."""
        finished = self.results.ids | self.errors.ids
        return [line for line in lines if line.custom_id not in finished]

    def close(self) -> None:
        self.results.close()
        self.errors.close()


def output_record(custom_id: str, outcome: Outcome) -> dict[str, Any]:
    """The batch output line of an answered request."""
    return {
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": custom_id,
        "response": {"status_code": outcome.status, "request_id": outcome.request_id,
                     "body": outcome.body},
        "error": None,
    }


def error_record(custom_id: str, outcome: Outcome) -> dict[str, Any]:
    """The error file line of a request that failed for good, with the reason."""
    response = None if outcome.status is None else {
        "status_code": outcome.status, "request_id": outcome.request_id, "body": outcome.body}
    return {
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": custom_id,
        "response": response,
        "error": {"code": outcome.error_code, "message": outcome.error},
    }
