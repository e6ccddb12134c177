"""A bulk job run straight against the endpoint: ``flexserve run`` (``--via direct``).

Reads what is done already (``results``), then sends every other line
through ``calls.send`` with as many in flight as the ``Pacer`` allows,
writing each answer (or final error) the moment it ends. Stops launching
when the job's deadline passes or the next request's worst case would pass
``max_cost``; lines not sent are left for a rerun, which picks up there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import openai

from flexserve.client.calls import CallPolicy, Events, Outcome, send
from flexserve.client.costs import Ledger, Prices, usage_tokens
from flexserve.client.jobs import Line
from flexserve.client.pacing import Pacer
from flexserve.client.results import JobFiles, ResultFile, error_record, output_record


@dataclass(frozen=True)
class RunOptions:
    """How a job is run (the CLI's flags)."""

    policy: CallPolicy = CallPolicy()
    # Requests in flight: a fixed number, or None for adaptive (AIMD).
    concurrency: int | None = None
    max_concurrency: int = 256
    # Seconds for the whole job (None: no limit).
    deadline: float | None = None
    prices: Prices = Prices()
    max_cost: Decimal | None = None
    # Send again the lines the error file holds (their error lines are dropped).
    retry_errors: bool = False
    # Seconds between progress reports.
    progress_every: float = 0.5


@dataclass
class Progress:
    """Where a job stands; handed to the progress callback as it goes."""

    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    refusals: int = 0
    retries: int = 0
    fell_back: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    limit: int = 0
    spent: Decimal = Decimal(0)
    saved: Decimal = Decimal(0)
    prices_known: bool = False
    started_at: float = field(default_factory=time.monotonic)
    finished: bool = False
    # Why the job stopped before every line was sent ("deadline", "max_cost").
    stopped: str | None = None
    by_tier: dict[str, int] = field(default_factory=dict)

    @property
    def remaining(self) -> int:
        return self.total - self.skipped - self.done - self.failed

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started_at


class _Counted(Events):
    """Refusals counted live, and passed on to the pacer."""

    def __init__(self, progress: Progress, pacer: Pacer) -> None:
        self.progress, self.pacer = progress, pacer

    def refused(self, status: int, retry_after: float | None) -> None:
        self.progress.retries += 1
        self.progress.refusals += status == 429
        self.pacer.refused(status, retry_after)

    def answered(self, seconds: float) -> None:
        self.pacer.answered(seconds)


async def run_job(
    client: openai.AsyncOpenAI,
    lines: Sequence[Line],
    output: Path,
    options: RunOptions,
    on_progress: Callable[[Progress], None] | None = None,
    on_outcome: Callable[[Line, Outcome], None] | None = None,
) -> Progress:
    """Run every line not yet in ``output`` (or its error file); return the
    progress at the end. ``on_outcome`` is told what became of each line
    sent, as it ends (after its line is written)."""
    client = client.with_options(max_retries=0)
    files = JobFiles(output)
    files.open(retry_errors=options.retry_errors)
    results, errors = files.results, files.errors
    progress = Progress(total=len(lines), prices_known=options.prices.known)
    try:
        todo = files.todo(lines)
        progress.skipped = len(lines) - len(todo)
        pacer = Pacer(fixed=options.concurrency, maximum=options.max_concurrency)
        ledger = Ledger(options.prices, options.max_cost)
        deadline = None if options.deadline is None else time.monotonic() + options.deadline
        events = _Counted(progress, pacer)
        background: list[asyncio.Task[None]] = []
        if on_progress is not None:
            background.append(asyncio.create_task(
                _report(progress, pacer, on_progress, options.progress_every)))
        if todo and options.policy.tier == "flex" and options.concurrency is None:
            max_wait = options.policy.fallback_after if options.policy.fallback_tier else None
            background.append(asyncio.create_task(
                pacer.follow_status(client, str(todo[0].body.get("model")), max_wait)))
        running: set[asyncio.Task[None]] = set()

        async def one(line: Line) -> None:
            try:
                outcome = await send(client, line.path, line.body, options.policy,
                                     deadline=deadline, events=events)
                _record(line, outcome, progress, ledger, results, errors)
                if on_outcome is not None:
                    on_outcome(line, outcome)
            finally:
                await pacer.release()

        hold_tier = _dearest(options)
        try:
            for line in todo:
                await pacer.acquire()
                if deadline is not None and time.monotonic() >= deadline:
                    progress.stopped = "deadline"
                elif not ledger.hold(line.custom_id, line.body, hold_tier):
                    progress.stopped = "max_cost"
                if progress.stopped:
                    await pacer.release()
                    break
                task = asyncio.create_task(one(line))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:
            for task in [*running, *background]:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*running, *background, return_exceptions=True)
        progress.spent, progress.saved = ledger.spent, ledger.saved
        progress.finished = True
        if on_progress is not None:
            progress.limit, progress.in_flight = pacer.allowed, 0
            on_progress(progress)
    finally:
        files.close()
    return progress


def _dearest(options: RunOptions) -> str | None:
    """The tier a request's hold is priced at: its own or its fallback's, the dearer."""
    tiers = [t for t in (options.policy.tier, options.policy.fallback_tier) if t is not None]

    def dearness(tier: str | None) -> tuple[Decimal, Decimal]:
        price = options.prices.for_tier(tier)
        return (price.output, price.input) if price else (Decimal(0), Decimal(0))

    return max(tiers, key=dearness) if tiers else None


def _record(line: Line, outcome: Outcome, progress: Progress, ledger: Ledger,
            results: ResultFile, errors: ResultFile) -> None:
    """Write what became of ``line`` and count it."""
    if outcome.ok:
        results.append(output_record(line.custom_id, outcome))
        ledger.settle(line.custom_id, outcome.usage, outcome.served_tier)
        progress.done += 1
        tokens = usage_tokens(outcome.usage)
        progress.input_tokens += tokens[0]
        progress.output_tokens += tokens[1]
        tier = outcome.served_tier or "unknown"
        progress.by_tier[tier] = progress.by_tier.get(tier, 0) + 1
    else:
        ledger.release(line.custom_id)
        if outcome.error_code == "deadline_exceeded":
            progress.stopped = "deadline"  # left for a rerun, not a failure
        else:
            errors.append(error_record(line.custom_id, outcome))
            progress.failed += 1
    progress.fell_back += outcome.fell_back
    progress.spent, progress.saved = ledger.spent, ledger.saved


async def _report(progress: Progress, pacer: Pacer, on_progress: Callable[[Progress], None],
                  every: float) -> None:
    while True:
        progress.limit, progress.in_flight = pacer.allowed, pacer.in_flight
        on_progress(progress)
        await asyncio.sleep(every)
