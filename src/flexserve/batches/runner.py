"""Runs batches: one task per active batch, in the gateway's own process.

Each batch moves validating → in_progress → finalizing → completed (or
failed, expired, cancelling → cancelled). While in progress, an organization
has at most ``batch_window`` lines in flight across its batches, given first
to the batch whose window closes first (``batches/lanes.py``); the rest wait
in the database, not in the scheduler's queue. Lines are claimed (marked
running) a few at a time and their results recorded in batches of a few,
with the batch's counts and totals, in one transaction each.

On start, every batch not in a final state is taken up again: lines left
running by a killed process are pending again, finished ones are never run
again. Output and error files are written from the lines' rows at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select

from flexserve.accounts import Principal
from flexserve.api.errors import database_unavailable
from flexserve.api.inference import Endpoint
from flexserve.api.state import Services
from flexserve.batches.lanes import BatchLanes
from flexserve.batches.lines import Retry, error_result, run_line
from flexserve.batches.store import BatchStore, LineResult, PendingLine
from flexserve.batches.validate import check_file, line_rows
from flexserve.batches.webhooks import announcing
from flexserve.billing.budget import Reservation
from flexserve.errors import FlexServeError, InsufficientQuotaError, ServiceUnavailableError
from flexserve.store.schema import organizations, projects
from flexserve.tiers import ServiceTier

log = logging.getLogger(__name__)

# Pause before retrying a line the engine failed: doubles from the first to the longest.
_RETRY_FIRST = 0.2
_RETRY_LONGEST = 30.0
# A wait for capacity (no room below flex, or a rate limit) is never longer than this.
_WAIT_LONGEST = 5.0
# Results are written at least this often while lines finish.
_FLUSH_INTERVAL = 0.05
# Seconds between looks at the batch's status in the database while it runs.
_STATUS_INTERVAL = 1.0
# More lines are claimed once this share of the lane is free: a few at a
# time (one claim is a transaction), soon enough that the engine stays fed.
_REFILL_SHARE = 0.25
# Pause before taking up a batch again after an unexpected error.
_ERROR_PAUSE = 1.0


class _Job:
    """One batch being run here."""

    def __init__(self, batch_id: str) -> None:
        self.batch_id = batch_id
        # Set to "cancel", "expire" or "shutdown" to stop taking lines.
        self.stop_reason: str | None = None
        self.stopped = asyncio.Event()
        self.results: list[LineResult] = []
        self.task: asyncio.Task[None] | None = None
        # Lines finished by this process since it took the batch up, and when
        # it did: the pace that estimates the rest.
        self.num_finished = 0
        self.started_at = time.monotonic()
        # Lines claimed and not yet finished.
        self.num_in_flight = 0
        # The batch's budget hold: its unfinished lines' expected cost, which
        # each line's own reservation is taken out of as it runs.
        self.hold: Reservation | None = None
        # Its completion window, which prices its lines.
        self.window: str | None = None

    def record(self, result: LineResult) -> None:
        """Keep a line's result until the next flush writes it. (Always into
        the list of the moment: a flush swaps it for a new one.)"""
        self.results.append(result)

    def stop(self, reason: str) -> None:
        if self.stop_reason is None or reason == "shutdown":
            self.stop_reason = reason
        self.stopped.set()


class BatchRunner:
    def __init__(self, services: Services, endpoints: dict[str, Endpoint], store: BatchStore,
                 files: Any) -> None:
        self._services = services
        self._endpoints = endpoints
        self._store = store
        self._files = files
        self._jobs: dict[str, _Job] = {}
        self._closing = False
        self._tmp = Path(services.settings.home) / "batches"
        # Lines in flight per organization, given to its batches by deadline.
        self.lanes = BatchLanes(max(1, services.settings.batch_window))
        # This gateway's name on the lines it claims: kept in its home, so
        # that after a restart it takes its own lines back at once.
        self.runner_id = runner_id(Path(services.settings.home))
        self._line_lease = services.settings.batch_line_lease
        self._adopter: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Every active batch: those this gateway left when it stopped too.
        for batch_id in await self._store.active_ids():
            self.submit(batch_id)
        self._adopter = asyncio.create_task(self._adopt_forever(), name="batch-adopt")

    async def _adopt_forever(self) -> None:
        """Run every batch in progress here too: lines are claimed one runner
        at a time, so gateways sharing a database share a batch's lines, and
        a batch whose gateway died is carried on by the others. (A batch
        being validated, cancelled or finalized is left to the gateway doing
        it: two would do it twice.)"""
        while not self._closing:
            await asyncio.sleep(self._services.settings.batch_adopt_interval)
            try:
                for batch_id in await self._store.active_ids(("in_progress",)):
                    self.submit(batch_id)
            except Exception:
                log.exception("looking for batches to run failed")

    def submit(self, batch_id: str) -> None:
        """Run the batch here, unless it already is."""
        if self._closing or batch_id in self._jobs:
            return
        job = _Job(batch_id)
        self._jobs[batch_id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"batch {batch_id}")

    def cancel(self, batch_id: str) -> None:
        job = self._jobs.get(batch_id)
        if job is not None:
            job.stop("cancel")
        else:
            self.submit(batch_id)

    def in_flight(self, batch_id: str) -> bool:
        return batch_id in self._jobs

    def lines_in_flight(self, batch_id: str) -> int | None:
        """Lines of the batch being run here now; None: it is not run here."""
        job = self._jobs.get(batch_id)
        return None if job is None else job.num_in_flight

    def estimated_completion(self, batch_id: str, num_left: int) -> int | None:
        """When the batch's ``num_left`` lines should be done, at the pace its
        lines have finished here (Unix seconds); None before any has."""
        job = self._jobs.get(batch_id)
        if job is None or job.num_finished == 0:
            return None
        pace = (time.monotonic() - job.started_at) / job.num_finished
        return int(time.time() + num_left * pace)

    async def close(self) -> None:
        """Stop every batch where it is: its unfinished lines run after the restart."""
        self._closing = True
        if self._adopter is not None:
            self._adopter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._adopter
        jobs = list(self._jobs.values())
        for job in jobs:
            job.stop("shutdown")
        tasks = [job.task for job in jobs if job.task is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def _run(self, job: _Job) -> None:
        try:
            while True:
                try:
                    await self._advance(job)
                    return
                except Exception:
                    # A busy or unreachable database, say: the lines' rows say
                    # where the batch is, so it is taken up again from them.
                    log.exception("batch %s stopped on an error; taking it up again", job.batch_id)
                if job.stop_reason == "shutdown":
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(job.stopped.wait(), _ERROR_PAUSE)
                if job.stop_reason == "shutdown":
                    return
        finally:
            self._jobs.pop(job.batch_id, None)
            if job.hold is not None:
                self._services.gate.release_budget(job.hold)

    async def _advance(self, job: _Job) -> None:
        store = self._store
        row = await store.get(None, job.batch_id)
        if row is None:
            return
        if row["status"] == "validating":
            try:
                await self._validate(job, row)
            except Exception as exc:
                if _passes(exc):
                    raise  # taken up again
                # Anything else fails the same way each time the batch is
                # taken up again: it would stay validating for ever.
                log.exception("batch %s could not be validated", job.batch_id)
                await self._store.discard_lines(job.batch_id)
                await self._fail(job.batch_id, [{
                    "code": "validation_error",
                    "message": f"The input file could not be taken in ({type(exc).__name__}).",
                    "param": None, "line": None,
                }])
                return
            row = await store.get(None, job.batch_id)
            assert row is not None
        job.window = row["completion_window"]
        if row["status"] == "in_progress":
            outcome = await self._execute(job, row)
            if outcome == "shutdown":
                return
            if outcome == "expire":
                await store.fail_unfinished(job.batch_id, "batch_expired",
                                            "The batch expired before this request was run.")
                await self._finalize(row, "expired")
                return
            if outcome == "done" and await store.num_unfinished(job.batch_id):
                if await store.num_run_elsewhere(job.batch_id, self.runner_id, _now()):
                    return  # other gateways run the last lines: one of them ends the batch
                # Every line ran, yet some are not recorded as finished: never
                # end a batch so; taken up again, they run again.
                raise RuntimeError("lines ran but are not recorded as finished")
            if not await store.set_status(job.batch_id, "finalizing", _now(),
                                          only_from=("in_progress",)):
                row = await store.get(None, job.batch_id)
                assert row is not None
                if row["status"] == "finalizing":
                    return  # another gateway ran the last lines: it writes the output
        if row["status"] == "cancelling":
            await store.fail_unfinished(job.batch_id, "batch_cancelled",
                                        "The batch was cancelled before this request was run.")
            await self._finalize(row, "cancelled")
            return
        row = await store.get(None, job.batch_id)
        assert row is not None
        if row["status"] == "finalizing":
            await self._finalize(row, "completed")

    # --- validation ----------------------------------------------------------------

    async def _validate(self, job: _Job, row: dict[str, Any]) -> None:
        services = self._services
        endpoint = self._endpoints[row["endpoint"]]
        batch_id = row["id"]
        try:
            record = await self._files.get(row["org_id"], row["input_file_id"])
            path = await self._files.local_path(record)
        except FlexServeError as exc:
            await self._fail(batch_id, [{"code": "invalid_file", "message": exc.message,
                                         "param": "input_file_id", "line": None}])
            return
        cost_of = functools.partial(services.gate.expected_cost, tier=ServiceTier.BATCH,
                                    window=row["completion_window"])
        checked = await asyncio.to_thread(
            check_file, path, endpoint, services.scheduler, services.settings, _hex(batch_id),
            cost_of,
        )
        if checked.num_errors:
            errors = checked.errors
            if checked.num_errors > len(errors):
                errors.append({
                    "code": "too_many_errors",
                    "message": f"{checked.num_errors - len(errors)} more errors not listed.",
                    "param": None, "line": None,
                })
            await self._fail(batch_id, errors)
            return
        # The batch's budget: held whole now, taken line by line as they run.
        try:
            job.hold = await services.gate.hold_budget(await self._principal(row),
                                                       checked.expected_cost)
        except InsufficientQuotaError as exc:
            await self._fail(batch_id, [{"code": exc.code, "message": exc.message, "param": None,
                                         "line": None}])
            return
        await self._store.discard_lines(batch_id)
        rows = line_rows(path, endpoint, services.settings, batch_id, checked, cost_of)
        while chunk := await asyncio.to_thread(next, rows, None):
            await self._store.add_lines(chunk)
        await self._store.start(batch_id, checked.num_lines, checked.model, _now())

    async def _fail(self, batch_id: str, errors: list[dict[str, Any]]) -> None:
        async with announcing(self._services, batch_id, "failed"):
            await self._store.set_status(
                batch_id, "failed", _now(), only_from=("validating",),
                errors=orjson.dumps(errors).decode(),
            )

    # --- execution -----------------------------------------------------------------

    async def _execute(self, job: _Job, row: dict[str, Any]) -> str:
        """Run the lines until none is left or the job is stopped; the reason it
        stopped ("done", "cancel", "expire", "shutdown")."""
        store = self._store
        endpoint = self._endpoints[row["endpoint"]]
        principal = await self._principal(row)
        await store.reclaim(job.batch_id, self.runner_id, _now(), own=True)
        if job.hold is None:
            # Taken up again after a restart: hold what is left, if the budget
            # still has room for it (else each line reserves its own).
            with contextlib.suppress(InsufficientQuotaError):
                job.hold = await self._services.gate.hold_budget(
                    principal, await store.unfinished_cost(job.batch_id))
        lanes, org_id, deadline = self.lanes, row["org_id"], float(row["expires_at"])
        in_flight: dict[asyncio.Task[None], PendingLine] = {}
        # Room asked of the organization's lane and not yet used.
        room: asyncio.Future[int] | None = None
        exhausted = False
        checked_at = time.monotonic()
        try:
            while job.stop_reason is None:
                if _now() >= row["expires_at"]:
                    job.stop("expire")
                    break
                if time.monotonic() - checked_at >= _STATUS_INTERVAL:
                    # Cancelled from elsewhere (the CLI, another gateway)?
                    checked_at = time.monotonic()
                    # This runner's claims renewed; a dead runner's lines back.
                    await store.renew(job.batch_id, self.runner_id, _now() + self._line_lease)
                    await store.reclaim(job.batch_id, self.runner_id, _now(), own=False)
                    current = await store.get(None, job.batch_id)
                    if current is not None and current["status"] != "in_progress":
                        job.stop("cancel")
                        break
                    if current is not None:
                        row = current
                refill_at = lanes.size - max(1, int(lanes.size * _REFILL_SHARE))
                if not exhausted and room is None and len(in_flight) <= refill_at:
                    room = lanes.request(org_id, deadline, lanes.size - len(in_flight))
                if room is not None and room.done():
                    granted, room = room.result(), None
                    claimed = await store.claim(job.batch_id, granted, runner=self.runner_id,
                                                lease_until=_now() + self._line_lease)
                    exhausted = len(claimed) < granted
                    lanes.give_back(org_id, granted - len(claimed))
                    for line in claimed:
                        task = asyncio.create_task(self._line(job, endpoint, principal, line))
                        task.add_done_callback(lambda _: lanes.give_back(org_id, 1))
                        in_flight[task] = line
                    job.num_in_flight = len(in_flight)
                if not in_flight and room is None:
                    break
                stop_wait: asyncio.Future[Any] = asyncio.ensure_future(job.stopped.wait())
                waiting: set[asyncio.Future[Any]] = {*in_flight, stop_wait}
                if room is not None:
                    waiting.add(room)
                done, _ = await asyncio.wait(
                    waiting, timeout=_FLUSH_INTERVAL if job.results else 1.0,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                stop_wait.cancel()
                for finished in done:
                    if finished is not stop_wait and finished is not room:
                        in_flight.pop(finished)  # type: ignore[call-overload]
                job.num_in_flight = len(in_flight)
                await self._flush(job)
        finally:
            if room is not None:
                lanes.withdraw(org_id, room)
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.wait(in_flight)
            job.num_in_flight = 0
            await self._flush(job)
        return job.stop_reason or "done"

    async def _line(self, job: _Job, endpoint: Endpoint, principal: Principal, line: PendingLine) -> None:
        settings = self._services.settings
        attempts = line.attempts
        failures = 0
        while True:
            try:
                await run_line(self._services, endpoint, principal, line, job.record,
                               hold=job.hold, window=job.window)
                return
            except Retry as retry:
                if retry.counts:
                    attempts += 1
                    failures += 1
                    if attempts > settings.batch_max_attempts:
                        job.record(error_result(line, retry.error))
                        return
                    pause = min(_RETRY_LONGEST, _RETRY_FIRST * 2 ** (failures - 1))
                else:
                    pause = min(_WAIT_LONGEST, max(0.05, retry.after))
                await asyncio.sleep(pause * (0.5 + random.random()))
            except Exception as exc:
                log.exception("batch %s line %d failed", job.batch_id, line.line)
                job.record(LineResult(line.line, "failed", error_code="batch_failed",
                                      error_message=f"The request failed: {exc}"))
                return

    async def _flush(self, job: _Job) -> None:
        results, job.results = job.results, []
        job.num_finished += len(results)
        await self._store.record(job.batch_id, results)

    async def _principal(self, row: dict[str, Any]) -> Principal:
        """Who the batch's lines are from: its creator's key, as of now."""
        db = self._services.db
        async with db.engine.connect() as conn:
            org = (await conn.execute(
                select(organizations.c.name, organizations.c.verification_status)
                .where(organizations.c.id == row["org_id"])
            )).first()
            project = (await conn.execute(
                select(projects.c.default_service_tier).where(projects.c.id == row["project_id"])
            )).first()
        return Principal(
            key_id=row["api_key_id"], org_id=row["org_id"], org_name="" if org is None else org.name,
            project_id=row["project_id"], is_admin=False,
            default_service_tier="default" if project is None else project.default_service_tier,
            verification_status="unverified" if org is None else org.verification_status,
        )

    # --- the end -------------------------------------------------------------------

    async def _finalize(self, row: dict[str, Any], status: str) -> None:
        """Write the output and error files from the lines' rows, then the final status."""
        batch_id = row["id"]
        self._tmp.mkdir(parents=True, exist_ok=True)
        out_path = self._tmp / f"{batch_id}_output.jsonl"
        err_path = self._tmp / f"{batch_id}_error.jsonl"
        num_out = num_err = 0
        with out_path.open("wb") as out, err_path.open("wb") as err:
            async for line in self._store.iter_finished(batch_id):
                item = output_line(batch_id, line)
                if line["state"] == "done":
                    out.write(item)
                    num_out += 1
                else:
                    err.write(item)
                    num_err += 1
        files: dict[str, Any] = {}
        ttl = row["output_ttl"]
        if num_out:
            record = await self._files.create_from_path(
                row["org_id"], "batch_output", f"{batch_id}_output.jsonl", out_path,
                ttl=ttl)
            files["output_file_id"] = record.id
        if num_err:
            record = await self._files.create_from_path(
                row["org_id"], "batch_output", f"{batch_id}_error.jsonl", err_path,
                ttl=ttl)
            files["error_file_id"] = record.id
        for path in (out_path, err_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        async with announcing(self._services, batch_id, status):
            await self._store.set_status(batch_id, status, _now(), **files)


def runner_id(home: Path) -> str:
    """The name this gateway claims batch lines under, made once per home."""
    path = home / "runner-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        name = f"runner-{uuid.uuid4().hex[:12]}"
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(name + "\n")
        return name


def output_line(batch_id: str, line: Any) -> bytes:
    """One line of the output or error file, in OpenAI's shape."""
    item: dict[str, Any] = {"id": f"batch_req_{_hex(batch_id)}_{line['line']}",
                            "custom_id": line["custom_id"]}
    if line["status_code"] is not None:
        item["response"] = {
            "status_code": line["status_code"],
            "request_id": line["request_id"],
            "body": orjson.loads(line["response"]) if line["response"] else None,
        }
        item["error"] = None
    else:
        item["response"] = None
        item["error"] = {"code": line["error_code"], "message": line["error_message"]}
    return orjson.dumps(item) + b"\n"


def _hex(batch_id: str) -> str:
    return batch_id.removeprefix("batch_")


def _passes(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage that passes (the database busy or away,
    the shared state in Redis unreachable, a timeout), after which the same
    step may succeed."""
    return database_unavailable(exc) or isinstance(exc, (ServiceUnavailableError, TimeoutError))


def _now() -> int:
    return int(time.time())
