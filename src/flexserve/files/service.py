"""Files: their rows in the database and their content in a directory.

The content of a file is written under a temporary name beside its final one,
flushed to disk, then renamed to the file's id, and only then is its row
inserted: a file that is listed always has its whole content, and an upload
that fails (the client leaves, a limit is passed) leaves nothing behind. The
content is written as it arrives, a bounded buffer at a time, so that an
upload of any size costs the gateway the same memory.

Every lookup is scoped to the organization: another organization's file is
as absent as one that never existed. A file past its ``expires_at`` is absent
too, and deleted when it is next looked up; listing deletes every expired
file (a bounded number per call), so expired content does not pile up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from sqlalchemy import and_, delete, insert, or_, select

from flexserve.errors import InvalidRequestError, NotFoundError
from flexserve.store.database import Database
from flexserve.store.schema import file_contents
from flexserve.store.schema import files as files_table

# OpenAI's limits on a batch input file.
BATCH_MAX_BYTES = 200 * 1024 * 1024
BATCH_MAX_LINES = 50_000
# A batch input file without `expires_after` expires after 30 days, as at OpenAI.
BATCH_DEFAULT_TTL = 30 * 24 * 3600
# `expires_after[seconds]`: between an hour and 30 days, as at OpenAI.
MIN_TTL, MAX_TTL = 3600, 30 * 24 * 3600
# Bytes gathered before each write to disk (done off the event loop).
_WRITE_BUFFER = 1024 * 1024
# Expired files deleted per listing.
_SWEEP_BATCH = 100
# Bytes per row of a file's content in the database (``in_database``).
_DB_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    org_id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int | None
    status: str = "processed"

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's ``OpenAIFile``."""
        document: dict[str, Any] = {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
        }
        if self.expires_at is None:
            # The spec types it as an integer, not nullable: absent rather than null.
            del document["expires_at"]
        return document


class UploadLimitError(InvalidRequestError):
    """An upload passed one of the limits of its purpose."""


_last_stamp = 0


def new_file_id() -> str:
    """``file-`` and 24 hex digits: a millisecond stamp that never goes back
    in this process, then random ones, so that files listed by (created_at,
    id) come in the order they were made, even within one second."""
    global _last_stamp
    _last_stamp = max(time.time_ns() // 1_000_000, _last_stamp + 1)
    return f"file-{_last_stamp & 0xFFFFFFFFFFFF:012x}{secrets.token_hex(6)}"


def not_found(file_id: str) -> NotFoundError:
    return NotFoundError(f"No such File object: {file_id}", param="file_id")


class LineCounter:
    """Counts the non-blank lines of content fed in pieces, up to a cap (past
    which it only says that there are more)."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self.lines = 0
        self._open = False  # the current, unfinished line has content

    @property
    def over(self) -> bool:
        return self.lines > self._cap

    def feed(self, chunk: bytes) -> None:
        if self.over:
            return
        *complete, last = chunk.split(b"\n")
        for piece in complete:
            if self._open or piece.strip():
                self.lines += 1
            self._open = False
        self._open = self._open or bool(last.strip())

    def finish(self) -> int:
        if self._open:
            self.lines += 1
            self._open = False
        return self.lines


class Files:
    """The files service: ``create``, ``get``, ``list``, ``delete``, and the
    path of a file's content for the code that reads it (the batch runner).

    The bytes live under ``root``. With ``in_database`` they are also written
    to the database (``file_contents``, 1 MiB chunks) in the transaction that
    records the file, and a gateway that lacks a file under its own root
    fetches it from there on first read: gateways sharing a database then
    share files without a shared volume."""

    def __init__(self, db: Database, root: Path, *, clock: Callable[[], float] = time.time,
                 in_database: bool = False) -> None:
        self._db = db
        self._root = Path(root)
        self._clock = clock
        self.in_database = in_database

    async def local_path(self, record: FileRecord) -> Path:
        """Where the file's bytes are on this gateway (fetched from the
        database first when they are only there); 404 if nowhere."""
        path = self._root / record.id
        if not self.in_database or await anyio.to_thread.run_sync(path.exists):
            return path
        partial = self._root / f".{record.id}.{secrets.token_hex(4)}.fetch"
        await anyio.to_thread.run_sync(lambda: self._root.mkdir(parents=True, exist_ok=True))
        found = False
        try:
            with open(partial, "wb") as out:
                async with self._db.engine.connect() as conn:
                    seq = 0
                    # A row at a time: a file may be larger than memory should hold.
                    while (data := (await conn.execute(
                            select(file_contents.c.data).where(file_contents.c.file_id == record.id,
                                                               file_contents.c.seq == seq))).scalar_one_or_none()
                           ) is not None:
                        found = True
                        await anyio.to_thread.run_sync(out.write, bytes(data))
                        seq += 1
            if not found and record.bytes:
                raise not_found(record.id)
            await anyio.to_thread.run_sync(os.replace, partial, path)
        finally:
            with contextlib.suppress(OSError):
                partial.unlink()
        return path

    def _now(self) -> int:
        return int(self._clock())

    async def create(
        self,
        org_id: str,
        purpose: str,
        filename: str,
        chunks: AsyncIterator[bytes],
        *,
        expires_at: int | None = None,
        ttl: int | None = None,
        max_bytes: int | None = None,
        max_lines: int | None = None,
    ) -> FileRecord:
        """Store the content ``chunks`` yields as a new file; 400 (and nothing
        stored) past ``max_bytes`` or ``max_lines`` (non-blank lines), which
        default to the batch limits for ``purpose="batch"``. It expires at
        ``expires_at``, or ``ttl`` seconds after its creation."""
        if purpose == "batch":
            max_bytes = BATCH_MAX_BYTES if max_bytes is None else max_bytes
            max_lines = BATCH_MAX_LINES if max_lines is None else max_lines
        file_id = new_file_id()
        created_at = self._now()
        if expires_at is None and ttl is not None:
            expires_at = created_at + ttl
        if expires_at is None and purpose == "batch":
            expires_at = created_at + BATCH_DEFAULT_TTL
        await anyio.to_thread.run_sync(lambda: self._root.mkdir(parents=True, exist_ok=True))
        final = self._root / file_id
        partial = self._root / f".{file_id}.part"
        counter = LineCounter(max_lines) if max_lines is not None else None
        size = 0
        try:
            with open(partial, "wb") as out:
                pending = bytearray()
                async for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise UploadLimitError(
                            f"The file is larger than the {max_bytes} bytes allowed for "
                            f"purpose '{purpose}'.",
                            param="file",
                            code="file_too_large",
                        )
                    if counter is not None:
                        counter.feed(chunk)
                        if counter.over:
                            raise _too_many_lines(max_lines, purpose)
                    pending += chunk
                    if len(pending) >= _WRITE_BUFFER:
                        data, pending = bytes(pending), bytearray()
                        await anyio.to_thread.run_sync(out.write, data)
                if counter is not None:
                    counter.finish()
                    if counter.over:
                        raise _too_many_lines(max_lines, purpose)
                data = bytes(pending)
                await anyio.to_thread.run_sync(_finish, out, data)
            await anyio.to_thread.run_sync(os.replace, partial, final)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        record = FileRecord(file_id, org_id, purpose, filename, size, created_at, expires_at)
        try:
            await self._insert(record, final)
        except BaseException:
            with contextlib.suppress(OSError):
                final.unlink()
            raise
        return record

    async def create_from_path(
        self, org_id: str, purpose: str, filename: str, path: Path, *, ttl: int | None = None
    ) -> FileRecord:
        """Move a finished local file in (a batch's output or error file); it
        expires ``ttl`` seconds after its creation, if given."""
        file_id = new_file_id()
        final = self._root / file_id

        def move() -> int:
            self._root.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), final)
            return final.stat().st_size

        size = await anyio.to_thread.run_sync(move)
        created_at = self._now()
        record = FileRecord(file_id, org_id, purpose, filename, size, created_at,
                            None if ttl is None else created_at + ttl)
        try:
            await self._insert(record, final)
        except BaseException:
            with contextlib.suppress(OSError):
                final.unlink()
            raise
        return record

    async def _insert(self, record: FileRecord, path: Path) -> None:
        """Record the file (and, ``in_database``, its bytes) in one transaction."""
        async with self._db.engine.begin() as conn:
            if self.in_database:
                with open(path, "rb") as source:
                    seq = 0
                    while data := await anyio.to_thread.run_sync(source.read, _DB_CHUNK):
                        await conn.execute(insert(file_contents).values(file_id=record.id, seq=seq, data=data))
                        seq += 1
            await conn.execute(
                insert(files_table).values(
                    id=record.id,
                    org_id=record.org_id,
                    purpose=record.purpose,
                    filename=record.filename,
                    bytes=record.bytes,
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                )
            )

    async def get(self, org_id: str, file_id: str) -> FileRecord:
        """The organization's file; 404 when it has none of that id (or it expired)."""
        if "\x00" in file_id:  # never an id: and PostgreSQL would refuse to look it up
            raise not_found(file_id)
        async with self._db.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(files_table).where(
                        files_table.c.id == file_id, files_table.c.org_id == org_id
                    )
                )
            ).first()
        if row is None:
            raise not_found(file_id)
        record = _record(row)
        if record.expires_at is not None and record.expires_at <= self._now():
            await self._remove([record.id])
            raise not_found(file_id)
        return record

    async def delete(self, org_id: str, file_id: str) -> None:
        """Delete the organization's file, row and content; 404 when it has none."""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                delete(files_table).where(
                    files_table.c.id == file_id, files_table.c.org_id == org_id
                )
            )
            if result.rowcount:
                await conn.execute(delete(file_contents).where(file_contents.c.file_id == file_id))
        if not result.rowcount:
            raise not_found(file_id)
        await anyio.to_thread.run_sync(self._unlink, file_id)

    async def list(
        self,
        org_id: str,
        *,
        purpose: str | None = None,
        limit: int = 20,
        order: str = "desc",
        after: str | None = None,
    ) -> tuple[list[FileRecord], bool]:
        """A page of the organization's files by ``created_at`` (then id), and
        whether more follow. ``after`` is the last id of the previous page."""
        await self.sweep()
        now = self._now()
        table = files_table
        query = select(table).where(
            table.c.org_id == org_id,
            or_(table.c.expires_at.is_(None), table.c.expires_at > now),
        )
        if purpose is not None:
            query = query.where(table.c.purpose == purpose)
        keys = (table.c.created_at, table.c.id)
        if after is not None:
            mark = await self._cursor(org_id, after)
            if order == "desc":
                query = query.where(
                    or_(keys[0] < mark[0], and_(keys[0] == mark[0], keys[1] < mark[1]))
                )
            else:
                query = query.where(
                    or_(keys[0] > mark[0], and_(keys[0] == mark[0], keys[1] > mark[1]))
                )
        ordering = [k.desc() for k in keys] if order == "desc" else list(keys)
        query = query.order_by(*ordering).limit(limit + 1)
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        records = [_record(row) for row in rows[:limit]]
        return records, len(rows) > limit

    async def _cursor(self, org_id: str, after: str) -> tuple[int, str]:
        async with self._db.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(files_table.c.created_at, files_table.c.id).where(
                        files_table.c.id == after, files_table.c.org_id == org_id
                    )
                )
            ).first()
        if row is None:
            raise InvalidRequestError(
                f"Invalid 'after': no file with id '{after}'.", param="after", code="invalid_value"
            )
        return int(row.created_at), str(row.id)

    async def sweep(self) -> int:
        """Delete up to a batch of expired files (any organization); how many."""
        async with self._db.engine.connect() as conn:
            ids = (
                await conn.execute(
                    select(files_table.c.id)
                    .where(files_table.c.expires_at <= self._now())
                    .limit(_SWEEP_BATCH)
                )
            ).scalars().all()
        if ids:
            await self._remove(ids)
        return len(ids)

    async def _remove(self, ids: Sequence[str]) -> None:
        async with self._db.engine.begin() as conn:
            await conn.execute(delete(files_table).where(files_table.c.id.in_(ids)))
            await conn.execute(delete(file_contents).where(file_contents.c.file_id.in_(ids)))

        def unlink_all() -> None:
            for file_id in ids:
                self._unlink(file_id)

        await anyio.to_thread.run_sync(unlink_all)

    def _unlink(self, file_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._root / file_id).unlink()


def _finish(out: Any, data: bytes) -> None:
    out.write(data)
    out.flush()
    os.fsync(out.fileno())


def _too_many_lines(max_lines: int | None, purpose: str) -> UploadLimitError:
    return UploadLimitError(
        f"The file has more than the {max_lines} lines allowed for purpose '{purpose}'.",
        param="file",
        code="too_many_lines",
    )


def _record(row: Any) -> FileRecord:
    return FileRecord(
        id=row.id,
        org_id=row.org_id,
        purpose=row.purpose,
        filename=row.filename,
        bytes=int(row.bytes),
        created_at=int(row.created_at),
        expires_at=None if row.expires_at is None else int(row.expires_at),
    )
