"""The batches and their lines in the database.

A batch's row is the Batch object's state; each input line has a row whose
``state`` is the truth about it (pending, running, done, failed). The runner
claims lines by marking them running and records each result in the same
transaction as the batch's counts, so a restarted gateway knows exactly what
is left, and every lookup a client makes is scoped to its organization.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import and_, delete, func, insert, or_, select, update

from flexserve.store.database import Database
from flexserve.store.schema import batch_lines, batches

# Statuses in which the runner still has work to do on a batch.
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")
# Finished lines read from the database at a time.
_PAGE = 500
_TIMESTAMPS = (
    "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
    "cancelling_at", "cancelled_at",
)


def line_request_id(batch_hex: str, line: int) -> str:
    """The request id a line is run and billed under, whatever the attempt."""
    return f"req_{batch_hex}_{line}"


@dataclass(frozen=True, slots=True)
class LineResult:
    """What became of one line: an output line (``done``) or an error line (``failed``)."""

    line: int
    state: str  # done or failed
    status_code: int | None = None
    response: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_pico: int = 0  # what its ledger row costs


@dataclass(frozen=True, slots=True)
class PendingLine:
    line: int
    custom_id: str
    body: dict[str, Any]
    request_id: str
    attempts: int


class BatchStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert(self, row: dict[str, Any]) -> None:
        async with self._db.engine.begin() as conn:
            await conn.execute(insert(batches).values(**row))

    async def get(self, org_id: str | None, batch_id: str) -> dict[str, Any] | None:
        """The batch's row; ``org_id`` None: any organization's (operators)."""
        statement = select(batches).where(batches.c.id == batch_id)
        if org_id is not None:
            statement = statement.where(batches.c.org_id == org_id)
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(statement)).mappings().first()
        return None if row is None else dict(row)

    async def page(
        self, org_id: str | None, *, limit: int, after: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; ``after`` is the id of the last batch of the previous page."""
        statement = select(batches)
        if org_id is not None:
            statement = statement.where(batches.c.org_id == org_id)
        if after is not None:
            cursor = await self.get(org_id, after)
            if cursor is not None:
                statement = statement.where(
                    or_(
                        batches.c.created_at < cursor["created_at"],
                        and_(batches.c.created_at == cursor["created_at"], batches.c.id < after),
                    )
                )
        statement = statement.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit + 1)
        async with self._db.engine.connect() as conn:
            rows = [dict(r) for r in (await conn.execute(statement)).mappings()]
        return rows[:limit], len(rows) > limit

    async def active_ids(self, statuses: tuple[str, ...] = ACTIVE_STATUSES) -> list[str]:
        """Batches in one of ``statuses`` (every active one by default), oldest first."""
        async with self._db.engine.connect() as conn:
            result = await conn.execute(
                select(batches.c.id)
                .where(batches.c.status.in_(statuses))
                .order_by(batches.c.created_at)
            )
            return [r[0] for r in result]

    async def set_status(
        self, batch_id: str, status: str, now: int, *, only_from: Sequence[str] | None = None,
        **fields: Any,
    ) -> bool:
        """Move the batch to ``status`` (stamping its ``<status>_at``), only from
        the statuses given; False when it was in none of them."""
        values = dict(fields)
        stamp = f"{status}_at"
        if stamp in _TIMESTAMPS:
            values[stamp] = now
        statement = update(batches).where(batches.c.id == batch_id).values(status=status, **values)
        if only_from is not None:
            statement = statement.where(batches.c.status.in_(only_from))
        async with self._db.engine.begin() as conn:
            result = await conn.execute(statement)
        return bool(result.rowcount)

    async def add_lines(self, rows: list[dict[str, Any]]) -> None:
        """A chunk of a batch's validated lines."""
        async with self._db.engine.begin() as conn:
            await conn.execute(insert(batch_lines), rows)

    async def start(self, batch_id: str, num_lines: int, model: str | None, now: int) -> bool:
        """The batch in progress, once all its lines are stored."""
        return await self.set_status(batch_id, "in_progress", now, only_from=("validating",),
                                     total=num_lines, model=model)

    async def discard_lines(self, batch_id: str) -> None:
        """Lines stored by a validation that did not finish (a killed gateway's)."""
        async with self._db.engine.begin() as conn:
            await conn.execute(delete(batch_lines).where(batch_lines.c.batch_id == batch_id))

    async def unfinished_cost(self, batch_id: str) -> int:
        """What the lines not yet finished are expected to cost (pico-USD)."""
        return await self._over_unfinished(
            batch_id, func.coalesce(func.sum(batch_lines.c.expected_cost_pico), 0))

    async def num_unfinished(self, batch_id: str) -> int:
        """Lines not yet finished (pending, or running)."""
        return await self._over_unfinished(batch_id, func.count())

    async def _over_unfinished(self, batch_id: str, total: Any) -> int:
        async with self._db.engine.connect() as conn:
            return int((await conn.execute(
                select(total).where(
                    batch_lines.c.batch_id == batch_id,
                    batch_lines.c.state.in_(("pending", "running")),
                )
            )).scalar_one())

    async def reclaim(self, batch_id: str, runner: str, now: int, *, own: bool) -> int:
        """Running lines whose runner stopped renewing its claim (a killed or
        lost gateway) and, with ``own``, those ``runner`` itself claimed in
        an earlier life (its process restarted): pending again, to be claimed
        afresh. The ledger bills a request id once, so a line finished but not
        recorded is not billed twice. The number of lines."""
        lapsed = or_(batch_lines.c.lease_until.is_(None), batch_lines.c.lease_until < now)
        if own:
            lapsed = or_(lapsed, batch_lines.c.claimed_by == runner)
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                update(batch_lines)
                .where(batch_lines.c.batch_id == batch_id, batch_lines.c.state == "running", lapsed)
                .values(state="pending", claimed_by=None, lease_until=None)
            )
            return int(result.rowcount or 0)

    async def num_run_elsewhere(self, batch_id: str, runner: str, now: int) -> int:
        """Lines other runners are running now (claims they still renew)."""
        async with self._db.engine.connect() as conn:
            return int((await conn.execute(
                select(func.count()).select_from(batch_lines).where(
                    batch_lines.c.batch_id == batch_id, batch_lines.c.state == "running",
                    batch_lines.c.claimed_by != runner, batch_lines.c.lease_until >= now,
                )
            )).scalar_one())

    async def renew(self, batch_id: str, runner: str, lease_until: int) -> None:
        """Extend ``runner``'s claims on the batch's lines it is running."""
        async with self._db.engine.begin() as conn:
            await conn.execute(
                update(batch_lines)
                .where(batch_lines.c.batch_id == batch_id, batch_lines.c.state == "running",
                       batch_lines.c.claimed_by == runner)
                .values(lease_until=lease_until)
            )

    async def claim(self, batch_id: str, limit: int, *, runner: str = "", lease_until: int = 0
                    ) -> list[PendingLine]:
        """Up to ``limit`` pending lines, in run order, marked running by
        ``runner`` until ``lease_until`` (Unix seconds; renewed by ``renew``):
        each line claimed once, however many claim at the same time."""
        # One statement, a write from the start: a read turned into a write
        # inside a transaction would fail at once on SQLite when another
        # writer got in between. On PostgreSQL concurrent claims skip the
        # lines another has locked, and a line another claimed while this one
        # waited for its lock is no longer pending (READ COMMITTED re-reads
        # the row for the outer WHERE). The choice is a materialized CTE: as a
        # plain subquery with SKIP LOCKED, PostgreSQL may run it again per row
        # and claim far more than ``limit`` (360 of 400 lines in one claim).
        chosen = (
            select(batch_lines.c.line)
            .where(batch_lines.c.batch_id == batch_id, batch_lines.c.state == "pending")
            .order_by(batch_lines.c.run_order)
            .limit(limit)
        )
        if self._db.dialect_name == "postgresql":
            chosen = chosen.with_for_update(skip_locked=True)
        lines = chosen.cte("chosen").prefix_with("MATERIALIZED", dialect="postgresql")
        async with self._db.engine.begin() as conn:
            rows = list(
                (await conn.execute(
                    update(batch_lines)
                    .where(batch_lines.c.batch_id == batch_id, batch_lines.c.state == "pending",
                           batch_lines.c.line.in_(select(lines.c.line)))
                    .values(state="running", attempts=batch_lines.c.attempts + 1,
                            claimed_by=runner or None, lease_until=lease_until or None)
                    .returning(
                        batch_lines.c.line, batch_lines.c.custom_id, batch_lines.c.body,
                        batch_lines.c.request_id, batch_lines.c.attempts, batch_lines.c.run_order,
                    )
                )).all()
            )
        rows.sort(key=lambda r: r.run_order)
        return [
            PendingLine(r.line, r.custom_id, orjson.loads(r.body), r.request_id, r.attempts)
            for r in rows
        ]

    async def record(self, batch_id: str, results: Iterable[LineResult]) -> None:
        """Results of finished lines, and the batch's counts, in one transaction."""
        results = list(results)
        if not results:
            return
        done = failed = 0
        totals = dict.fromkeys(("prompt_tokens", "completion_tokens", "cached_tokens", "cost_pico"), 0)
        async with self._db.engine.begin() as conn:
            for result in results:
                changed = await conn.execute(
                    update(batch_lines)
                    .where(
                        batch_lines.c.batch_id == batch_id,
                        batch_lines.c.line == result.line,
                        # Recorded once: a line already finished keeps its result.
                        batch_lines.c.state.in_(("pending", "running")),
                    )
                    .values(
                        state=result.state,
                        status_code=result.status_code,
                        response=None if result.response is None else orjson.dumps(result.response).decode(),
                        error_code=result.error_code,
                        error_message=result.error_message,
                        prompt_tokens=result.prompt_tokens,
                        completion_tokens=result.completion_tokens,
                        cached_tokens=result.cached_tokens,
                    )
                )
                if changed.rowcount:
                    if result.state == "done":
                        done += 1
                        for name in totals:
                            totals[name] += getattr(result, name)
                    else:
                        failed += 1
            await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id)
                .values(completed=batches.c.completed + done, failed=batches.c.failed + failed,
                        **{name: batches.c[name] + value for name, value in totals.items()})
            )

    async def fail_unfinished(self, batch_id: str, code: str, message: str) -> None:
        """Every line not finished gets an error line: the batch is ending."""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                update(batch_lines)
                .where(
                    batch_lines.c.batch_id == batch_id,
                    batch_lines.c.state.in_(("pending", "running")),
                )
                .values(state="failed", error_code=code, error_message=message)
            )
            await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id)
                .values(failed=batches.c.failed + result.rowcount)
            )

    async def finished_lines(
        self, batch_id: str, *, after: int = -1, limit: int = _PAGE,
        states: tuple[str, ...] = ("done", "failed"),
    ) -> list[Any]:
        """Up to ``limit`` finished lines past line number ``after``, in file
        order: read a page at a time, so a 50,000-line batch's results are
        never all in memory at once."""
        async with self._db.engine.connect() as conn:
            return list(
                (
                    await conn.execute(
                        select(batch_lines)
                        .where(
                            batch_lines.c.batch_id == batch_id,
                            batch_lines.c.line > after,
                            batch_lines.c.state.in_(states),
                        )
                        .order_by(batch_lines.c.line)
                        .limit(limit)
                    )
                ).mappings()
            )

    async def iter_finished(
        self, batch_id: str, states: tuple[str, ...] = ("done", "failed")
    ) -> AsyncIterator[Any]:
        """Every finished line (of ``states``), in file order, a page at a time."""
        after = -1
        while True:
            page = await self.finished_lines(batch_id, after=after, states=states)
            for line in page:
                yield line
            if len(page) < _PAGE:
                return
            after = page[-1]["line"]

    async def num_running(self, batch_id: str) -> int:
        """Lines being run now."""
        async with self._db.engine.connect() as conn:
            return int((await conn.execute(
                select(func.count()).where(batch_lines.c.batch_id == batch_id,
                                           batch_lines.c.state == "running")
            )).scalar_one())
