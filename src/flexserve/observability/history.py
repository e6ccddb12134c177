"""The last hour of what the operator's page plots, kept in this gateway's
memory: every ``SAMPLE_SECONDS``, the sequences in flight on each replica by
tier, the gateway's queue by tier and its running counts of flex refusals
and preemptions; as requests finish, their organization, tier, queue time,
TTFT and TPOT; and the requests refused before an engine ran them.

It is this gateway's view: behind a load balancer each gateway plots its
own requests (the ledger's figures on the page are everyone's). A restart
starts the hour afresh. Sampling is a few dict reads every five seconds; a
finished request adds one small tuple to a bounded deque.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flexserve.tiers import ServiceTier

if TYPE_CHECKING:
    from flexserve.scheduler.scheduler import Scheduler

SAMPLE_SECONDS = 5.0
KEEP_SECONDS = 3600.0
# Requests remembered at most (the oldest go first), whatever their age.
MAX_FINISHED = 50_000


@dataclass(frozen=True, slots=True)
class ReplicaSample:
    name: str
    capacity: int  # sequences it runs at once (whoever sends them)
    in_flight: dict[str, int]  # tier -> sequences this gateway runs there


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # unix seconds
    replicas: tuple[ReplicaSample, ...]
    queued: dict[str, int]  # tier -> requests waiting in the gateway's queue
    flex_refused: int  # running counts since the gateway started
    preemptions: int


@dataclass(frozen=True, slots=True)
class Finished:
    at: float  # unix seconds
    org_id: str
    tier: str  # served
    queue_time: float
    ttft: float | None
    tpot: float | None  # seconds per output token after the first


@dataclass(frozen=True, slots=True)
class Refused:
    at: float  # unix seconds
    org_id: str | None  # None: refused before its key was known
    tier: str | None  # requested, when it was read
    status: int  # the HTTP status it got
    code: str


class LiveHistory:
    """Samples of the scheduler and the requests finished, for ``KEEP_SECONDS``."""

    def __init__(self, scheduler: Scheduler, *, interval: float = SAMPLE_SECONDS,
                 keep: float = KEEP_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self._scheduler = scheduler
        self.interval = interval
        self.keep = keep
        self._clock = clock
        self.samples: deque[Sample] = deque(maxlen=max(2, int(keep / interval) + 1))
        self._finished: deque[Finished] = deque(maxlen=MAX_FINISHED)
        self._refused: deque[Refused] = deque(maxlen=MAX_FINISHED)
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> Sample:
        """Take a sample now (and keep it)."""
        replicas: dict[str, ReplicaSample] = {}
        queued = dict.fromkeys((t.value for t in ServiceTier), 0)
        refused = preempted = 0
        for pool in self._scheduler.pools.values():
            refused += pool.num_flex_refused
            preempted += pool.num_preemptions
            for tier in ServiceTier:
                queued[tier.value] += pool.queue.num_waiting(tier)
            for replica in pool.replicas:
                # A replica serving several models is one engine: sample it once.
                replicas[replica.name] = ReplicaSample(
                    replica.name, replica.full_capacity,
                    {tier.value: n for tier, n in replica.num_in_flight_by_tier.items()},
                )
        taken = Sample(self._clock(), tuple(replicas.values()), queued, refused, preempted)
        self.samples.append(taken)
        return taken

    def observe(self, org_id: str, tier: str, queue_time: float, ttft: float | None,
                tpot: float | None) -> None:
        """A request finished (or ended) on an engine."""
        self._finished.append(Finished(self._clock(), org_id, tier, queue_time, ttft, tpot))

    def observe_refused(self, org_id: str | None, tier: str | None, status: int, code: str) -> None:
        """A request answered with an error before an engine ran it."""
        self._refused.append(Refused(self._clock(), org_id, tier, status, code))

    def finished(self) -> list[Finished]:
        """The requests finished within the window, oldest first."""
        return _recent(self._finished, self._clock() - self.keep)

    def refused(self) -> list[Refused]:
        """The requests refused within the window, oldest first."""
        return _recent(self._refused, self._clock() - self.keep)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="live-history")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)


def _recent(found: deque[Finished] | deque[Refused], start: float) -> list[Any]:
    while found and found[0].at < start:
        found.popleft()
    return list(found)
