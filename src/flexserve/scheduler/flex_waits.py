"""Flex deadlines: who is refused, when, what they are told, and what
clients and operators read of the waits.

A flex request waits at most its deadline (``X-Flex-Max-Wait``, capped by
``flex_max_wait``). It is refused with 429 on arrival only when even the
optimistic end (p10) of its estimated wait (``estimates.py``) is past that
deadline; once queued, when the deadline passes, or earlier when the
estimate says it can no longer make it (the shedding pass at every load
reading). Every refusal keeps the request's place in the queue
(``holds.py``) and tells it, in ``Retry-After``, when that place will be near
enough to the front for its deadline.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from flexserve.errors import ResourceUnavailableError, told_retry_after
from flexserve.observability.requests import log_decision
from flexserve.scheduler.drain import build_timeline, estimate_for, observe, requests_ahead, wait_in_queue
from flexserve.scheduler.estimates import NO_WAIT, DrainTimeline, WaitEstimate, retry_after
from flexserve.scheduler.holds import HOLD_GRACE, READ_SECONDS, Hold
from flexserve.scheduler.policy import SchedulerConfig, spare_capacity
from flexserve.scheduler.queue import Waiter
from flexserve.scheduler.replicas import ModelPool
from flexserve.tiers import ServiceTier

if TYPE_CHECKING:
    from flexserve.scheduler.scheduler import Ticket


class FlexWaits:
    """The deadline rules of flex waiters, for one scheduler's config."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    def deadline(self, ticket: Ticket) -> float:
        """Seconds the ticket may wait: its own limit, capped by the server's."""
        return self.limit(ticket.max_wait)

    def limit(self, max_wait: float | None) -> float:
        """Seconds a flex request with the client's ``max_wait`` (None: none)
        may wait: that, capped by the server's ``flex_max_wait``."""
        limit = self.config.flex_max_wait
        if max_wait is not None:
            limit = min(limit, max_wait)
        return max(0.0, limit)

    def arrive(self, pool: ModelPool, ticket: Ticket, now: float) -> Hold | None:
        """The place held for a flex request arriving now, taken out: the one
        its client named (``X-Flex-Place``: a status read's, or a refusal's)
        or the one its refusal held (its body's fingerprint) — the earlier of
        the two when it has both. One that names no place lets go of its
        organization's oldest read place (it may be that reader's), so that a
        read is not counted beside its own request."""
        found = [
            held for key in (ticket.place, ticket.fingerprint)
            if (held := pool.holds.claim(ticket.org_id, key, now)) is not None
        ]
        if ticket.place is None:
            pool.holds.drop_oldest_read(ticket.org_id, now)
        return min(found, key=lambda held: held.arrival) if found else None

    def on_arrival(
        self, pool: ModelPool, ticket: Ticket, waiter: Waiter, now: float, *, front: bool,
        held: Hold | None = None,
    ) -> bool:
        """Place a flex waiter about to join the queue: at its ``held`` place
        (returns True: the queue puts it there by ``waiter.arrival``), else
        at the back. Refuse it at once when even the optimistic end (p10) of
        its wait is past its deadline; record the estimate it was given."""
        wait_limit = waiter.wait_limit
        if held is not None:
            waiter.arrival = held.arrival
        timeline = build_timeline(pool, self.config, now)
        estimate = _wait_at(timeline, pool, ticket.org_id, ticket.cost_tokens, now, held, front=front)
        if not front:
            ticket.estimated_wait = estimate
        if wait_limit <= 0 or (estimate is not None and estimate.p10 > wait_limit):
            pool.num_flex_refused += 1
            raise self._refuse(pool, waiter, now, timeline, estimate)
        waiter.deadline = ticket.enqueued_at + wait_limit
        return held is not None

    def queue_full(self, pool: ModelPool, ticket: Ticket, waiter: Waiter, now: float) -> ResourceUnavailableError:
        """The refusal of a flex request that finds the queue full."""
        pool.num_flex_refused += 1
        error = self._refuse(pool, waiter, now)
        error.message = "The flex queue for this model is full; retry later."
        return error

    def expire(self, pool: ModelPool, waiter: Waiter) -> None:
        """A queued flex waiter's deadline passed: refuse it, keeping its place."""
        if not waiter.queued or waiter.future.done():
            return
        pool.queue.remove(waiter)
        pool.num_flex_refused += 1
        waiter.future.set_exception(self._refuse(pool, waiter, time.monotonic()))

    def shed_hopeless(self, pool: ModelPool) -> None:
        """Refuse waiting flex whose optimistic (p10) wait now ends past its deadline.

        From the newest, so the pass costs what it sheds, not the queue's
        length; each one's place is the nearer of its place in joining order
        and its place at the back of its organization's flow (the fair queue
        may release it sooner than joining order says). Run at every load
        reading, it first lets the estimates learn what they learn there."""
        now = time.monotonic()
        queue = pool.queue
        num_waiting = queue.num_waiting(ServiceTier.FLEX)
        observe(pool, self.config, now)
        if num_waiting == 0:
            return
        timeline = build_timeline(pool, self.config, now)
        if timeline.num_slots == 0:
            return
        num_urgent = queue.num_waiting(ServiceTier.PRIORITY) + queue.num_waiting(ServiceTier.DEFAULT)
        position = num_urgent + num_waiting - 1
        hopeless: list[tuple[Waiter, WaitEstimate]] = []
        for waiter in queue.flex_newest_first():
            in_flow = num_urgent + max(0, queue.flex_requests_ahead(waiter.org_id, 0) - 1)
            estimate = timeline.wait(min(position, in_flow))
            if estimate is None or waiter.deadline is None or now + estimate.p10 <= waiter.deadline:
                break  # those ahead of it wait less and no longer
            hopeless.append((waiter, estimate))
            position -= 1
        for waiter, estimate in hopeless:
            queue.remove(waiter)
            pool.num_flex_refused += 1
            if not waiter.future.done():
                waiter.future.set_exception(self._refuse(pool, waiter, now, timeline, estimate))

    def _refuse(
        self, pool: ModelPool, waiter: Waiter, now: float,
        timeline: DrainTimeline | None = None, estimate: WaitEstimate | None = None,
    ) -> ResourceUnavailableError:
        """The 429 for a flex waiter refused now. Its place is held (from its
        arrival, so a request that waited keeps the place it waited for), and
        ``Retry-After`` is when that place will likely be within its deadline
        of the front; the places held count as queued, so clients refused
        together are each told their own time."""
        if timeline is None:
            timeline = build_timeline(pool, self.config, now)
        place = timeline.place(requests_ahead(pool, waiter.org_id, waiter.cost_tokens, now, before=waiter.arrival))
        if place is None:
            # Nothing to estimate from: the configured pause, spread over a tenth of it.
            seconds = self.config.unknown_wait_retry_after * (1 + 0.01 * (len(pool.holds) % 10))
        else:
            seconds = retry_after(place, waiter.wait_limit)
        # The client is due back when Retry-After says, in whole seconds.
        seconds = told_retry_after(seconds)
        log_decision("flex_refused", waiter.request_id, org_id=waiter.org_id, model=pool.model,
                     retry_after_s=round(seconds, 3), deadline_s=round(waiter.wait_limit, 3),
                     estimated_wait_p10_s=None if estimate is None else round(estimate.p10, 3))
        if waiter.key is None:  # nothing to claim it by: it only spreads the returns
            pool.holds.hold(
                waiter.org_id, (), waiter.arrival, waiter.cost_tokens, now + seconds, returns_at=now + seconds
            )
            return _refusal(seconds, estimate, None)
        name = secrets.token_urlsafe(12)
        held = pool.holds.hold(
            waiter.org_id, (waiter.key, place_key(name)), waiter.arrival, waiter.cost_tokens,
            now + seconds + HOLD_GRACE, returns_at=now + seconds, name=name,
        )
        return _refusal(seconds, estimate, None if held is None else held.name)

    def status(
        self, pools: list[tuple[str, ModelPool]], *, one_model: bool, max_wait: float | None, org_id: str,
        place: str | None = None,
    ) -> list[dict[str, Any]]:
        """``Scheduler.flex_status`` for ``pools``. Asked about one model by
        an organization, the read holds the place it reports (``holds.py``):
        the ``place`` named, if it is still held (a refusal's, or an earlier
        read's), else a new one at the back."""
        now = time.monotonic()
        wait_limit = self.limit(max_wait)
        status = []
        for name, pool in pools:
            depth = pool.queue.num_waiting(ServiceTier.FLEX)
            spare = spare_capacity(self.config, pool.replicas, now) if self.config.tiers_enabled else 0.0
            healthy = any(r.healthy for r in pool.replicas)
            estimate = None
            reported = None
            named = None
            if place is not None and org_id and one_model:
                named = pool.holds.find(org_id, place_key(place), now)
            if healthy and named is not None:
                timeline = build_timeline(pool, self.config, now)
                estimate = _wait_at(timeline, pool, org_id, named.cost_tokens, now, named)
                pool.holds.hold(org_id, named.keys, named.arrival, named.cost_tokens, now + READ_SECONDS)
                reported = named.name
            elif healthy:
                cost = round(pool.flex_history.typical_cost)
                idle = spare > 0 and depth == 0 and len(pool.holds) == 0
                estimate = NO_WAIT if idle else estimate_for(pool, self.config, now, org_id, cost)
                if org_id and one_model and estimate is not None:
                    reported = secrets.token_urlsafe(12)
                    pool.holds.hold(
                        org_id, (place_key(reported),), now, cost, now + READ_SECONDS,
                        returns_at=now, name=reported, read=True,
                    )
            if estimate is None:
                fits = wait_limit > 0
            elif wait_limit <= 0:
                fits = estimate.p50 == 0
            else:
                fits = estimate.p10 <= wait_limit
            accepting = healthy and len(pool.queue) < self.config.max_queue and fits
            status.append(
                {
                    "model": name,
                    "spare_capacity": round(spare, 4),
                    "queue_depth": depth,
                    "estimated_wait_seconds": None if estimate is None else round(estimate.p50, 3),
                    "estimated_wait_p90_seconds": None if estimate is None else round(estimate.p90, 3),
                    "accepting": accepting,
                    "place": reported,
                }
            )
        return status


def _wait_at(
    timeline: DrainTimeline, pool: ModelPool, org_id: str, cost_tokens: int, now: float,
    held: Hold | None, *, front: bool = False,
) -> WaitEstimate | None:
    """The wait of a flex request of ``org_id`` joining now: at the back (or
    the ``front``), or at its ``held`` place (a refusal's, near the front by
    the time its client is back; a read's, at the back)."""
    before = None if held is None else held.arrival
    return wait_in_queue(timeline, pool, org_id, cost_tokens, now, front=front, before=before)


# On a flex 429: the name of the place held for the request (``holds.py``).
PLACE_HEADER = "x-flex-place"


def place_key(place: str) -> bytes:
    """The key a place named in ``X-Flex-Place`` is held under (apart from
    the fingerprints of bodies)."""
    return b"place:" + place.encode()


def _refusal(retry_after: float, estimate: WaitEstimate | None, place: str | None) -> ResourceUnavailableError:
    why = (
        f"the estimated wait (likely {estimate.p10:.0f} to {estimate.p90:.0f} s) is longer "
        "than this request's deadline"
        if estimate is not None
        else "no flex capacity became free before this request's deadline"
    )
    return ResourceUnavailableError(
        f"Flex capacity is unavailable right now: {why}. Retry later, or send the "
        "request on the default tier.",
        retry_after=retry_after,
        headers=None if place is None else {PLACE_HEADER: place},
    )
