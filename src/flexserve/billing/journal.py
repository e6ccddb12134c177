"""The usage journal: each ledger row appended to a local file before the
response it bills is sent, so that a gateway killed at any moment (kill -9,
the OOM killer, a crash) has lost no row of a response its client received.

The journal is a directory of segment files next to the SQLite database
(``<home>/usage-journal``; a gateway on PostgreSQL keeps its own in its own
home). A row is one line::

    <crc32 of the JSON, 8 hex digits> <the usage_records row as JSON>\\n

written with a single ``os.write`` to a file opened ``O_APPEND``. Once
``write`` returns, the bytes are in the kernel's page cache, which outlives
the process: a process crash loses nothing. No ``fsync`` is made: it costs
about half a millisecond per row on the disks measured, and it only buys
survival of a power loss or a kernel crash — after which SQLite itself, with
``synchronous=NORMAL``, may also have lost its last commits
(docs/billing.md, "A delivered response is billed").

A line cut short (the last one, if the disk filled up mid-write) or whose
checksum does not match is skipped at replay and logged.

Segments turn over with the usage writer's batches: ``seal`` closes the
current segment, so that every row submitted so far is in a sealed one; once
those rows are committed, ``discard`` deletes the sealed segments. At
start-up ``open`` hands back every row still in a segment (rows the database
may or may not have), which the writer inserts again, ignoring request ids
already stored.

One process owns a journal at a time: ``open`` takes an exclusive ``flock``
on the directory's lock file (released by the kernel however the process
ends), so two gateways given the same home fail at start instead of
replaying and deleting each other's rows.
"""

from __future__ import annotations

import fcntl
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import orjson

logger = logging.getLogger(__name__)

_PREFIX = "usage-"
_SUFFIX = ".jsonl"


class JournalError(RuntimeError):
    """The journal cannot be used (its directory is taken or unreadable)."""


def encode_line(row: dict[str, Any]) -> bytes:
    """One journal line for a row: checksum, space, JSON, newline."""
    data = orjson.dumps(row)
    return b"%08x %s\n" % (zlib.crc32(data), data)


def decode_lines(data: bytes, source: str = "journal") -> list[dict[str, Any]]:
    """The rows of a segment's bytes; torn or corrupt lines are skipped (and logged)."""
    rows: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    # After the last newline: nothing, or a line the process did not finish writing.
    if lines[-1]:
        logger.warning("%s: skipped an unfinished last line (%d bytes)", source, len(lines[-1]))
    for number, line in enumerate(lines[:-1], start=1):
        checksum, _, payload = line.partition(b" ")
        try:
            valid = len(checksum) == 8 and int(checksum, 16) == zlib.crc32(payload)
            row = orjson.loads(payload) if valid else None
        except ValueError:
            row = None
        if not isinstance(row, dict):
            logger.error("%s, line %d: checksum or JSON is wrong; line skipped: %r",
                         source, number, line[:200])
            continue
        rows.append(row)
    return rows


class UsageJournal:
    """Append-only segment files of usage rows, in one directory."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the segment being appended to; None until a row comes
        self._seq = 0  # number of the next segment to open
        self._sealed: list[tuple[int, Path]] = []  # written to and closed, rows maybe not stored

    def open(self) -> list[dict[str, Any]]:
        """Take the directory and return the rows left in it by an earlier process.

        Those segments count as sealed: ``discard`` removes them once their
        rows are stored."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise JournalError(
                f"usage journal {self.directory} is in use by another gateway process; "
                "give each gateway its own home"
            ) from None
        self._lock_fd = lock_fd
        rows: list[dict[str, Any]] = []
        for seq, path in self._segments():
            rows += decode_lines(path.read_bytes(), str(path))
            self._sealed.append((seq, path))
            self._seq = seq + 1
        return rows

    def append(self, row: dict[str, Any]) -> None:
        """Write one row. Raises ``OSError`` (disk full, …) if it is not all written."""
        line = encode_line(row)
        if self._fd is None:
            self._start_segment()
        assert self._fd is not None
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"usage journal: wrote {written} of {len(line)} bytes")
        except OSError:
            # Whatever reached the file ends in a torn line; later rows go to
            # a fresh segment so that they do not continue it.
            self.seal()
            raise

    def sync(self) -> None:
        """fsync the open segment. The gateway does not call it (see above);
        ``flexserve bench hot-path`` does, to show what it would cost a row."""
        if self._fd is not None:
            os.fsync(self._fd)

    def seal(self) -> int:
        """Close the current segment. Returns the mark to hand ``discard`` once
        every row appended so far is stored."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        return self._seq

    def discard(self, mark: int) -> None:
        """Delete the sealed segments before ``mark``: their rows are stored."""
        keep: list[tuple[int, Path]] = []
        for seq, path in self._sealed:
            if seq < mark:
                path.unlink(missing_ok=True)
            else:
                keep.append((seq, path))
        self._sealed = keep

    @property
    def num_segments(self) -> int:
        """Segment files on disk: sealed ones plus the open one."""
        return len(self._sealed) + (self._fd is not None)

    def close(self) -> None:
        """Close the open segment and let the directory go (the files stay)."""
        self.seal()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _start_segment(self) -> None:
        seq = self._seq
        path = self.directory / f"{_PREFIX}{seq:012d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._seq = seq + 1
        # Sealed from the start as far as discard is concerned: a mark is
        # only ever taken after seal(), when this segment is closed.
        self._sealed.append((seq, path))

    def _segments(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.glob(f"{_PREFIX}*{_SUFFIX}"):
            number = path.name[len(_PREFIX):-len(_SUFFIX)]
            if number.isdigit():
                found.append((int(number), path))
        return sorted(found)
