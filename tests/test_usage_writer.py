"""The usage writer: batched, idempotent, lossless on close, never in the way."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select

from flexserve.billing.usage import UsageRecord, UsageWriter
from flexserve.store import Database
from flexserve.store.schema import usage_records


@pytest.fixture
async def db(tmp_db_url: str) -> AsyncIterator[Database]:
    database = Database.from_url(tmp_db_url)
    await database.migrate()
    yield database
    await database.close()


def record(request_id: str, **changes: Any) -> UsageRecord:
    fields: dict[str, Any] = dict(
        request_id=request_id,
        org_id="org-1",
        project_id="proj_1",
        api_key_id="key_1",
        model="sim-llama3-8b",
        requested_tier="auto",
        served_tier="flex",
        prompt_tokens=12,
        completion_tokens=34,
        queue_time=0.0123,
        ttft=0.2504,
        total_time=1.5,
        status="completed",
        created_at=1_750_000_000.9,
    )
    fields.update(changes)
    return UsageRecord(**fields)


async def stored_ids(db: Database) -> list[str]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(select(usage_records.c.request_id).order_by(usage_records.c.id))
        return [row[0] for row in rows]


@contextmanager
def usage_batches(db: Database) -> Iterator[list[int]]:
    """The size of each usage INSERT the database receives, as it receives it."""
    sizes: list[int] = []

    def seen(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if statement.startswith("INSERT INTO usage_records"):
            sizes.append(len(parameters) if many else 1)

    event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
    try:
        yield sizes
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", seen)


async def test_a_row_is_stored_with_durations_in_ms(db: Database) -> None:
    writer = UsageWriter(db)
    writer.submit(record("req_1"))
    writer.submit(record("req_2", ttft=None, status="client_disconnected"))
    await writer.close()
    async with db.engine.connect() as conn:
        rows = (await conn.execute(select(usage_records).order_by(usage_records.c.id))).all()
    first = rows[0]._asdict()
    del first["id"]
    assert first == {
        "request_id": "req_1",
        "org_id": "org-1",
        "project_id": "proj_1",
        "api_key_id": "key_1",
        "model": "sim-llama3-8b",
        "requested_tier": "auto",
        "served_tier": "flex",
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "queue_time_ms": 12,
        "ttft_ms": 250,
        "total_time_ms": 1500,
        "status": "completed",
        "created_at": 1_750_000_000,
        # Unpriced and uncached: the billing columns keep their defaults.
        "cached_tokens": 0,
        "input_price_micro": None,
        "cached_input_price_micro": None,
        "output_price_micro": None,
        "input_cost_pico": 0,
        "cached_input_cost_pico": 0,
        "output_cost_pico": 0,
        "list_cost_pico": 0,
    }
    assert (rows[1].ttft_ms, rows[1].status) == (None, "client_disconnected")
    assert writer.num_written == 2


async def test_rows_are_written_in_batches_of_at_most_batch_size(db: Database) -> None:
    writer = UsageWriter(db, flush_interval=60, batch_size=10)
    await writer.start()
    with usage_batches(db) as sizes:
        for i in range(25):
            writer.submit(record(f"req_{i}"))
        await writer.flush()
    await writer.close()
    assert sizes == [10, 10, 5]
    assert await stored_ids(db) == [f"req_{i}" for i in range(25)]
    assert writer.num_written == 25 and writer.num_pending == 0


async def test_rows_arriving_within_the_window_share_one_insert(db: Database) -> None:
    writer = UsageWriter(db, flush_interval=0.05, batch_size=500)
    written = asyncio.Event()
    await writer.start()
    with usage_batches(db) as sizes:
        event.listen(db.engine.sync_engine, "commit", lambda conn: written.set())
        writer.submit(record("req_a"))
        await asyncio.sleep(0)  # the writer task wakes, and waits out the window
        writer.submit(record("req_b"))
        writer.submit(record("req_c"))
        # No flush(): the task writes on its own once the window has passed.
        await asyncio.wait_for(written.wait(), timeout=10)
    await writer.close()
    assert sizes == [3]
    assert await stored_ids(db) == ["req_a", "req_b", "req_c"]


async def test_a_duplicate_request_id_is_stored_once(db: Database) -> None:
    writer = UsageWriter(db, batch_size=4)
    writer.submit(record("req_dup", completion_tokens=1))
    writer.submit(record("req_dup", completion_tokens=2))  # same batch
    await writer.flush()
    writer.submit(record("req_dup", completion_tokens=3))  # a later batch
    writer.submit(record("req_other"))
    await writer.close()
    assert sorted(await stored_ids(db)) == ["req_dup", "req_other"]
    async with db.engine.connect() as conn:
        tokens = (
            await conn.execute(
                select(usage_records.c.completion_tokens).where(
                    usage_records.c.request_id == "req_dup"
                )
            )
        ).scalar_one()
    assert tokens == 1  # the first write wins; a retry cannot change a billed row
    # A duplicate is expected (a retried write), not a row the database refused.
    assert (writer.num_written, writer.num_dropped) == (4, 0)


async def test_close_writes_everything_still_buffered(db: Database) -> None:
    writer = UsageWriter(db, flush_interval=3600, batch_size=1000)
    await writer.start()
    for i in range(7):
        writer.submit(record(f"req_{i}"))
    assert await stored_ids(db) == []  # still inside the batching window
    await writer.close()
    assert len(await stored_ids(db)) == 7
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(record("req_late"))


@pytest.mark.sqlite_only
async def test_submit_never_waits_for_the_database(db: Database, tmp_path: Any) -> None:
    assert not inspect.iscoroutinefunction(UsageWriter.submit)
    writer = UsageWriter(db, flush_interval=0, batch_size=50)
    await writer.start()
    # Another process holds SQLite's write lock: every write has to wait.
    blocker = sqlite3.connect(str(tmp_path / "flexserve.db"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for i in range(200):
            writer.submit(record(f"req_{i}"))
            await asyncio.sleep(0)  # the loop keeps running while the writer waits
        assert await stored_ids(db) == []  # readers are not blocked by the writer (WAL)
        assert writer.num_pending == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await writer.close()
    assert len(await stored_ids(db)) == 200


@pytest.mark.sqlite_only
async def test_a_failed_write_keeps_the_rows_for_the_next_attempt(tmp_db_url: str) -> None:
    db = Database.from_url(tmp_db_url)  # not migrated yet: the table is missing
    try:
        writer = UsageWriter(db)
        writer.submit(record("req_1"))
        writer.submit(record("req_2"))
        with pytest.raises(Exception, match="usage_records"):
            await writer.flush()
        assert (writer.num_pending, writer.num_written) == (2, 0)
        await db.migrate()
        await writer.close()
        assert await stored_ids(db) == ["req_1", "req_2"]
        assert writer.num_written == 2
    finally:
        await db.close()


class ErrorLogged(logging.Handler):
    """Sets an event when the usage writer logs an error."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.event.set()


@pytest.mark.sqlite_only
async def test_the_task_retries_after_a_failure(tmp_db_url: str) -> None:
    db = Database.from_url(tmp_db_url)  # not migrated yet: the first write fails
    logger = logging.getLogger("flexserve.billing.usage")
    failed = ErrorLogged()
    logger.addHandler(failed)
    try:
        writer = UsageWriter(db, flush_interval=0)
        committed = asyncio.Event()
        await writer.start()
        writer.submit(record("req_1"))
        await asyncio.wait_for(failed.event.wait(), timeout=10)
        assert (writer.num_pending, writer.num_written) == (1, 0)
        async with db.engine.begin() as conn:
            await conn.run_sync(lambda c: usage_records.metadata.create_all(c))
        event.listen(db.engine.sync_engine, "commit", lambda conn: committed.set())
        await asyncio.wait_for(committed.wait(), timeout=10)  # the retry, after its pause
        await writer.flush()  # waits for the task's write to finish: nothing left to do
        assert writer.num_written == 1
        await writer.close()
        assert await stored_ids(db) == ["req_1"]
    finally:
        logger.removeHandler(failed)
        await db.close()


async def test_a_row_the_database_refuses_does_not_hold_up_the_others(db: Database) -> None:
    writer = UsageWriter(db)
    writer.submit(record("req_1"))
    writer.submit(record("req_bad", model=None))  # NOT NULL
    writer.submit(record("req_worse", total_time=None))  # not a number at all
    writer.submit(record("req_2"))
    await writer.close()
    assert await stored_ids(db) == ["req_1", "req_2"]
    assert (writer.num_written, writer.num_dropped) == (2, 2)
