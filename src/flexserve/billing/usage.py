"""Usage records — the ledger — journaled on the request path, then written
to the database in batches by one background task.

A record carries its cost, made at the served tier's price, and that price
beside it (``billing.cost``, ``billing.pricing``); a request id is stored once
(see below), so each finished request is charged exactly once.

A delivered response is billed, even if the gateway is killed (kill -9)
right after sending it:

- ``UsageWriter.submit`` is called before the response's last bytes are sent
  (``api.pipeline``: before a whole answer's body, before a stream's final
  chunk and ``[DONE]``). It appends the row to the local usage journal
  (``billing.journal``: one ``os.write``, a few microseconds, no ``fsync``)
  and to an in-memory buffer, and returns: a request never waits for the
  database.
- The writer task wakes on the first row, lets ``flush_interval`` pass so
  that the rows arriving meanwhile share one INSERT, and writes them in
  batches of at most ``batch_size``. The journal segments holding them are
  deleted only once they are committed.
- At start-up (``start``), before anything else reads the ledger — the
  budgets are seeded from it right after — the rows left in the journal by a
  process that died are inserted again. The INSERT ignores a ``request_id``
  already stored, so a row written before the crash is not stored twice.

While the database is down or locked, rows wait in the buffer and the
journal, retried with a growing pause. Up to ``max_pending`` of them:
past that, ``check_room`` refuses new billable requests with 503 and
``Retry-After`` rather than serve work it could lose track of. A row the
journal could not take (disk full) exists only in memory: new requests are
refused the same way until it is committed.

A record the database refuses outright (a constraint or a value it cannot
store) is the one exception: it would hold up every record behind it, so it
is logged in full at ERROR and dropped (``num_dropped``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError

from flexserve.billing.cost import NO_COST, LineCosts
from flexserve.billing.journal import UsageJournal
from flexserve.billing.pricing import ModelPrice
from flexserve.errors import LedgerUnavailableError
from flexserve.store.database import Database
from flexserve.store.schema import usage_records

logger = logging.getLogger(__name__)

# The pause after a failed write doubles from the first to the longest.
_RETRY_FIRST = 0.5
_RETRY_LONGEST = 30.0
# Attempts at storing the journal's rows at start-up before giving up.
_REPLAY_ATTEMPTS = 5


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
    """Journals usage rows and writes them in batches from one task."""

    def __init__(
        self,
        db: Database,
        flush_interval: float = 0.2,
        batch_size: int = 500,
        *,
        journal: UsageJournal | None = None,
        max_pending: int = 0,
    ) -> None:
        """``journal``: None keeps rows in memory only (lost if the process
        dies). ``max_pending``: rows waiting for the database past which
        ``check_room`` refuses new work; 0: no bound."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self._db = db
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._journal = journal
        self._max_pending = max_pending
        self._insert = _insert_ignoring_duplicates(db.dialect_name)
        self._buffer: list[dict[str, Any]] = []  # usage_records rows, oldest first
        self._num_unjournaled = 0  # rows in the buffer the journal could not take
        self._retry_pause = 0.0  # the writer's pause after its last failure; 0 when healthy
        # One write at a time, whether the task's, flush()'s or close()'s:
        # only the lock holder takes rows off the front of the buffer.
        self._lock = asyncio.Lock()
        self._rows_waiting = asyncio.Event()
        self._batch_full = asyncio.Event()  # also set by close(): no window to wait out
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.num_written = 0  # rows stored (a duplicate request_id counts: it is stored)
        self.num_dropped = 0  # rows the database refused outright (logged)
        self.num_replayed = 0  # rows found in the journal at start and written again

    @property
    def num_pending(self) -> int:
        """Rows submitted and not yet written."""
        return len(self._buffer)

    async def start(self) -> None:
        """Replay the journal (raises if its rows cannot be stored), then
        start the writer task."""
        if self._task is not None or self._closing.is_set():
            return
        if self._journal is not None:
            rows = self._journal.open()
            try:
                if rows:
                    await self._replay(rows)
            except BaseException:
                self._journal.close()  # the rows stay in it, for the next start
                raise
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    def submit(self, record: UsageRecord) -> None:
        """Journal a record and queue it for writing. Returns at once; never
        touches the database."""
        if self._closing.is_set():
            raise RuntimeError("the usage writer is closed")
        try:
            row = record.to_row()
        except (TypeError, ValueError, OverflowError):
            logger.exception("usage record dropped, it has a bad value: %r", record)
            self.num_dropped += 1
            return
        if self._journal is not None:
            try:
                self._journal.append(row)
            except OSError:
                # Kept in memory, written as usual; new work waits until it is.
                logger.exception("usage journal write failed; row kept in memory: %r", row)
                self._num_unjournaled += 1
        self._buffer.append(row)
        self._rows_waiting.set()
        if len(self._buffer) >= self._batch_size:
            self._batch_full.set()

    def check_room(self) -> None:
        """Raise 503 with Retry-After when a new billable request could not be
        billed safely: too many rows waiting for the database, or a row the
        journal could not take."""
        if self._num_unjournaled:
            reason = "the usage journal cannot be written"
        elif self._max_pending and len(self._buffer) >= self._max_pending:
            reason = f"{len(self._buffer)} usage rows are waiting for the database"
        else:
            return
        raise LedgerUnavailableError(
            f"The service cannot record usage right now ({reason}); please retry shortly.",
            retry_after=max(1.0, self._retry_pause, self._flush_interval),
        )

    async def flush(self) -> None:
        """Write every row submitted so far. Raises, keeping the rows, if that fails."""
        async with self._lock:
            # Rows that arrive meanwhile wait for the next window, not this
            # call. Every row in the buffer is now in a sealed segment (no
            # await between the two lines: no row can come in between).
            mark = self._journal.seal() if self._journal is not None else 0
            num_left = len(self._buffer)
            num_unjournaled = self._num_unjournaled
            while num_left > 0:
                batch = self._buffer[: min(num_left, self._batch_size)]
                num_dropped = await self._write(batch)
                # Submit only appends, so the batch is still the buffer's front.
                del self._buffer[: len(batch)]
                num_left -= len(batch)
                self.num_written += len(batch) - num_dropped
                self.num_dropped += num_dropped
            self._num_unjournaled -= num_unjournaled
            if self._journal is not None:
                self._journal.discard(mark)

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
            if self._journal is not None and not self._num_unjournaled:
                logger.error(
                    "closing with %d usage rows unwritten; they stay in %s and are "
                    "written at the next start",
                    len(self._buffer),
                    self._journal.directory,
                )
            else:
                # Last resort: the rows in the log, so that an operator can replay them.
                logger.error(
                    "closing with %d usage rows unwritten: %s",
                    len(self._buffer),
                    json.dumps(self._buffer, default=repr),
                )
            raise
        finally:
            if self._journal is not None:
                self._journal.close()

    async def _replay(self, rows: list[dict[str, Any]]) -> None:
        """Store the rows an earlier process journaled, before anything reads
        the ledger. A failure is retried a few times, then raised: starting
        with budgets that miss delivered responses would be worse than not
        starting."""
        assert self._journal is not None
        logger.warning("usage journal: writing %d rows left by an earlier process", len(rows))
        for attempt in range(1, _REPLAY_ATTEMPTS + 1):
            try:
                num_dropped = 0
                for start in range(0, len(rows), self._batch_size):
                    num_dropped += await self._write(rows[start : start + self._batch_size])
            except Exception:
                if attempt == _REPLAY_ATTEMPTS:
                    raise
                pause = _RETRY_FIRST * 2 ** (attempt - 1)
                logger.exception(
                    "replaying the usage journal failed (attempt %d); retrying in %.1fs",
                    attempt,
                    pause,
                )
                await asyncio.sleep(pause)
            else:
                break
        self.num_replayed = len(rows) - num_dropped
        self.num_dropped += num_dropped
        self._journal.discard(self._journal.seal())

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
                self._retry_pause = pause
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
                self._retry_pause = 0.0

    async def _write(self, rows: list[dict[str, Any]]) -> int:
        """Insert one batch; returns how many of its rows had to be dropped."""
        try:
            await self._insert_rows(rows)
        except (IntegrityError, DataError):
            # Some row breaks a constraint. Write the rows one at a time, so
            # that it holds up no other; any other error keeps the batch.
            num_dropped = 0
            for row in rows:
                try:
                    await self._insert_rows([row])
                except (IntegrityError, DataError):
                    logger.exception("usage row dropped, the database refused it: %r", row)
                    num_dropped += 1
            return num_dropped
        return 0

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
