"""Usage records — the ledger — written in batches by one background task,
off the request path.

A record carries its cost, made at the served tier's price, and that price
beside it (``billing.cost``, ``billing.pricing``); a request id is stored once
(see below), so each finished request is charged exactly once.

``UsageWriter.submit`` appends a record to an in-memory buffer and returns:
a request never waits for the database. The writer task wakes on the first
record, lets ``flush_interval`` pass so that the records arriving meanwhile
share one INSERT, and writes them in batches of at most ``batch_size``.

Nothing is lost on the way:

- a record leaves the buffer only once its batch is committed, so a failed
  write keeps it and is retried (with a growing pause) until it succeeds;
- the INSERT ignores a ``request_id`` already stored, so writing a batch
  again after an ambiguous failure stores each request once;
- ``close()`` writes everything still buffered.

A record the database refuses outright (a constraint or a value it cannot
store) is the one exception: it would hold up every record behind it, so it
is logged in full at ERROR, for replay, and dropped (``num_dropped``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError

from flexserve.billing.cost import NO_COST, LineCosts
from flexserve.billing.pricing import ModelPrice
from flexserve.store.database import Database
from flexserve.store.schema import usage_records

logger = logging.getLogger(__name__)

# The pause after a failed write doubles from the first to the longest.
_RETRY_FIRST = 0.5
_RETRY_LONGEST = 30.0


@dataclass(slots=True)
class UsageRecord:
    """What one finished request used and how long it took."""

    request_id: str
    org_id: str
    project_id: str
    api_key_id: str
    model: str
    requested_tier: str  # as the client sent it, `auto` included
    served_tier: str  # the tier it actually ran on: the one it is billed at
    prompt_tokens: int
    completion_tokens: int
    queue_time: float  # seconds from arrival until an engine took it
    ttft: float | None  # seconds from arrival to the first token; None if none came
    total_time: float  # seconds from arrival to the end of the response
    status: str  # "completed", "client_disconnected", "error", …
    created_at: float = field(default_factory=time.time)  # unix seconds; default: now
    # Billing, filled in by the gate when the request settles (api.gates):
    cached_tokens: int = 0  # the part of prompt_tokens served from a prompt cache
    # The served tier's price, micro-dollars per 1M tokens; None: model unpriced.
    price: ModelPrice | None = None
    costs: LineCosts = NO_COST  # what is charged, pico-dollars per line item
    list_cost: int = 0  # the same tokens at the list (default-tier) price, pico-dollars

    def to_row(self) -> dict[str, Any]:
        """The ``usage_records`` row: durations in integer ms, time in whole seconds."""
        return {
            "request_id": self.request_id,
            "org_id": self.org_id,
            "project_id": self.project_id,
            "api_key_id": self.api_key_id,
            "model": self.model,
            "requested_tier": self.requested_tier,
            "served_tier": self.served_tier,
            "prompt_tokens": int(self.prompt_tokens),
            "completion_tokens": int(self.completion_tokens),
            "queue_time_ms": _ms(self.queue_time),
            "ttft_ms": None if self.ttft is None else _ms(self.ttft),
            "total_time_ms": _ms(self.total_time),
            "status": self.status,
            "created_at": int(self.created_at),
            "cached_tokens": int(self.cached_tokens),
            "input_price_micro": None if self.price is None else self.price.input,
            "cached_input_price_micro": None if self.price is None else self.price.cached_input,
            "output_price_micro": None if self.price is None else self.price.output,
            "input_cost_pico": self.costs.input,
            "cached_input_cost_pico": self.costs.cached_input,
            "output_cost_pico": self.costs.output,
            "list_cost_pico": self.list_cost,
        }


class UsageWriter:
    """Buffers usage records and writes them in batches from one task."""

    def __init__(self, db: Database, flush_interval: float = 0.2, batch_size: int = 500) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self._db = db
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._insert = _insert_ignoring_duplicates(db.dialect_name)
        self._buffer: list[UsageRecord] = []
        # One write at a time, whether the task's, flush()'s or close()'s:
        # only the lock holder takes rows off the front of the buffer.
        self._lock = asyncio.Lock()
        self._rows_waiting = asyncio.Event()
        self._batch_full = asyncio.Event()  # also set by close(): no window to wait out
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.num_written = 0  # rows stored (a duplicate request_id counts: it is stored)
        self.num_dropped = 0  # rows the database refused outright (logged)

    @property
    def num_pending(self) -> int:
        """Rows submitted and not yet written."""
        return len(self._buffer)

    async def start(self) -> None:
        if self._task is None and not self._closing.is_set():
            self._task = asyncio.create_task(self._run(), name="usage-writer")

    def submit(self, record: UsageRecord) -> None:
        """Queue a record for writing. Returns at once; never touches the database."""
        if self._closing.is_set():
            raise RuntimeError("the usage writer is closed")
        self._buffer.append(record)
        self._rows_waiting.set()
        if len(self._buffer) >= self._batch_size:
            self._batch_full.set()

    async def flush(self) -> None:
        """Write every row submitted so far. Raises, keeping the rows, if that fails."""
        async with self._lock:
            # Rows that arrive meanwhile wait for the next window, not this call.
            num_left = len(self._buffer)
            while num_left > 0:
                batch = self._buffer[: min(num_left, self._batch_size)]
                num_dropped = await self._write(batch)
                # Submit only appends, so the batch is still the buffer's front.
                del self._buffer[: len(batch)]
                num_left -= len(batch)
                self.num_written += len(batch) - num_dropped
                self.num_dropped += num_dropped

    async def close(self) -> None:
        """Stop the task and write everything still buffered."""
        self._closing.set()
        self._rows_waiting.set()
        self._batch_full.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task])
        try:
            await self.flush()
        except Exception:
            # Last resort: the rows in the log, so that an operator can replay them.
            logger.error(
                "closing with %d usage rows unwritten: %s",
                len(self._buffer),
                json.dumps([asdict(record) for record in self._buffer], default=repr),
            )
            raise

    async def _run(self) -> None:
        num_failures = 0
        while not self._closing.is_set():
            await self._rows_waiting.wait()
            if len(self._buffer) < self._batch_size:
                # The batching window: rows arriving meanwhile share the INSERT.
                await _wait(self._batch_full, self._flush_interval)
            self._rows_waiting.clear()
            self._batch_full.clear()
            try:
                await self.flush()
            except Exception:
                num_failures += 1
                pause = min(_RETRY_LONGEST, _RETRY_FIRST * 2 ** (num_failures - 1))
                logger.exception(
                    "writing %d usage rows failed (attempt %d); retrying in %.1fs",
                    len(self._buffer),
                    num_failures,
                    pause,
                )
                self._rows_waiting.set()  # the rows are all still there
                await _wait(self._closing, pause)
            else:
                num_failures = 0

    async def _write(self, batch: list[UsageRecord]) -> int:
        """Insert one batch; returns how many of its rows had to be dropped."""
        rows: list[dict[str, Any]] = []
        num_dropped = 0
        for record in batch:
            try:
                rows.append(record.to_row())
            except (TypeError, ValueError, OverflowError):
                logger.exception("usage record dropped, it has a bad value: %r", record)
                num_dropped += 1
        if not rows:
            return num_dropped
        try:
            await self._insert_rows(rows)
        except (IntegrityError, DataError):
            # Some row breaks a constraint. Write the rows one at a time, so
            # that it holds up no other; any other error keeps the batch.
            for row in rows:
                try:
                    await self._insert_rows([row])
                except (IntegrityError, DataError):
                    logger.exception("usage row dropped, the database refused it: %r", row)
                    num_dropped += 1
        return num_dropped

    async def _insert_rows(self, rows: list[dict[str, Any]]) -> None:
        # A list of parameter sets: one executemany, one round trip, one commit.
        async with self._db.engine.begin() as conn:
            await conn.execute(self._insert, rows)


def _insert_ignoring_duplicates(dialect_name: str) -> Insert:
    """INSERT … ON CONFLICT (request_id) DO NOTHING, in the database's own dialect."""
    if dialect_name == "sqlite":
        return sqlite.insert(usage_records).on_conflict_do_nothing(index_elements=["request_id"])
    if dialect_name == "postgresql":
        return postgresql.insert(usage_records).on_conflict_do_nothing(
            index_elements=["request_id"]
        )
    raise ValueError(f"usage records cannot be written to a {dialect_name!r} database")


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` seconds have passed."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
