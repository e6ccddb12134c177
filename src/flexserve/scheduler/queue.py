"""The gateway's waiting queue for one model.

Priority and default waiters share one heap ordered by
``(tier_rank, arrival, seq)``; flex (and batch) waiters sit in fair queues
that share their tier across organizations by deficit round robin. Higher
tiers always come out first. With tiers turned off (a tier-blind FCFS gateway,
for comparison) every waiter goes in the heap by arrival alone.

Entries are removed lazily: a waiter that leaves (client gone, deadline
passed) is marked and skipped when it reaches the head, so leaving is O(1).

``on_wait`` tells the request's own task that it is about to wait: the HTTP
edge uses it to watch a client's connection only while its request waits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from flexserve.engines.base import monotonic_now
from flexserve.scheduler.fairness import FairQueue
from flexserve.tiers import ServiceTier

# Called in a request's own task as the request joins a queue. A watch on the
# client's connection costs a task per request (5-6 µs) and most requests are
# admitted without waiting, so the HTTP edge starts one only from here.
on_wait: ContextVar[Callable[[], None] | None] = ContextVar("flexserve_on_wait", default=None)


@dataclass(eq=False, slots=True)
class Waiter:
    """A request waiting for room on a replica of its model."""

    tier: ServiceTier
    org_id: str
    # Tokens this request is expected to cost (prompt + max output), for fair shares.
    cost_tokens: int
    arrival: float = field(default_factory=monotonic_now)
    # Resolved with the granted replica, or failed with the reason it was refused.
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    seq: int = 0
    # False once the waiter has left the queue (granted, or gone).
    queued: bool = True
    # time.monotonic() after which a flex waiter is refused with 429; None: waits.
    deadline: float | None = None
    # The timer that enforces the deadline, cancelled when the waiter leaves.
    timer: asyncio.TimerHandle | None = None
    # What the scheduler puts on the granted replica (a replicas.Running).
    run: Any = None
    # Flex: seconds it may wait, and its request's fingerprint (its place is
    # held under it if it is refused: ``holds.py``).
    wait_limit: float = 0.0
    key: bytes | None = None
    # Of ``cost_tokens``, the prompt's (the rest is the output limit).
    prompt_tokens: int = 0
    # For the request log (a refusal may be decided outside the request's task).
    request_id: str = ""

    def leave(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class TierQueue:
    """Waiters by tier rank; FIFO within priority and default; fair within flex."""

    def __init__(self, *, tiers_enabled: bool = True, fair_quantum: int = 2048) -> None:
        self.tiers_enabled = tiers_enabled
        self._heap: list[tuple[tuple[int, float, int], Waiter]] = []
        self._fair = {
            ServiceTier.FLEX: FairQueue(fair_quantum),
            ServiceTier.BATCH: FairQueue(fair_quantum),
        }
        self._seq = itertools.count()
        self._num_by_tier = dict.fromkeys(ServiceTier, 0)
        # Prompt tokens of the flex waiters (for the service time of the queued work).
        self._flex_prompt_tokens = 0

    def __len__(self) -> int:
        return sum(self._num_by_tier.values())

    def num_waiting(self, tier: ServiceTier | None = None) -> int:
        return len(self) if tier is None else self._num_by_tier[tier]

    def push(self, waiter: Waiter, *, front: bool = False, in_place: bool = False) -> None:
        """Queue a waiter; ``front`` puts preempted work back at the head of its
        flow, ``in_place`` a flex waiter at its place by arrival (a held place)."""
        hook = on_wait.get()
        if hook is not None:
            hook()
        waiter.seq = next(self._seq)
        waiter.queued = True
        self._num_by_tier[waiter.tier] += 1
        if waiter.tier is ServiceTier.FLEX:
            self._flex_prompt_tokens += waiter.prompt_tokens
        fair = self._fair.get(waiter.tier) if self.tiers_enabled else None
        if fair is not None:
            fair.push(waiter, front=front, in_place=in_place)
            return
        rank = waiter.tier.rank if self.tiers_enabled else 0
        arrival = float("-inf") if front else waiter.arrival
        heapq.heappush(self._heap, ((rank, arrival, waiter.seq), waiter))

    def remove(self, waiter: Waiter) -> None:
        """Take a waiter out (lazily: its entry is skipped later)."""
        if waiter.queued:
            fair = self._fair.get(waiter.tier) if self.tiers_enabled else None
            if fair is not None:
                fair.remove(waiter)
            waiter.queued = False
            self._left(waiter)
        waiter.leave()

    def peek(self) -> Waiter | None:
        while self._heap and not self._heap[0][1].queued:
            heapq.heappop(self._heap)
        if self._heap:
            return self._heap[0][1]
        if self.tiers_enabled:
            for fair in self._fair.values():
                head = fair.peek()
                if head is not None:
                    assert isinstance(head, Waiter)
                    return head
        return None

    def pop(self) -> Waiter | None:
        head = self.peek()
        if head is None:
            return None
        fair = self._fair.get(head.tier) if self.tiers_enabled else None
        if fair is not None:
            fair.pop()  # marks the waiter as no longer queued
            self._left(head)
            head.leave()
        else:
            heapq.heappop(self._heap)
            self.remove(head)
        return head

    def waiting_by_org(self) -> dict[str, int]:
        """Waiters per organization, every tier."""
        counts: dict[str, int] = {}
        waiters = [w for _, w in self._heap]
        for fair in self._fair.values():
            waiters.extend(fair.newest_first())  # type: ignore[arg-type]
        for waiter in waiters:
            if waiter.queued:
                counts[waiter.org_id] = counts.get(waiter.org_id, 0) + 1
        return counts

    def set_weights(self, weights: dict[str, float]) -> None:
        """Each organization's share of a turn within flex and batch (1: an
        equal one; see ``FairQueue.weights``)."""
        for fair in self._fair.values():
            fair.weights = weights

    def _left(self, waiter: Waiter) -> None:
        self._num_by_tier[waiter.tier] -= 1
        if waiter.tier is ServiceTier.FLEX:
            self._flex_prompt_tokens -= waiter.prompt_tokens

    def flex_tokens(self) -> tuple[int, int, int]:
        """Expected tokens, prompt tokens and number of the flex waiters."""
        if not self.tiers_enabled:
            return 0, 0, 0
        fair = self._fair[ServiceTier.FLEX]
        return fair.num_tokens, self._flex_prompt_tokens, len(fair)

    def flex_requests_ahead(
        self, org_id: str, cost_tokens: int, *, front: bool = False, before: float | None = None,
        held_tokens: int = 0,
    ) -> int:
        """Flex waiters released before one that ``org_id`` queues now (at its
        place by arrival ``before``, if given), by deficit round robin: the
        tokens ahead of it, with ``held_tokens`` of places held ahead of it,
        over a waiter's mean cost. With tiers off, everything waiting is ahead."""
        if not self.tiers_enabled:
            return 0 if front else len(self)
        fair = self._fair[ServiceTier.FLEX]
        if len(fair) == 0 and held_tokens == 0:
            return 0
        mean_cost = max(1.0, fair.num_tokens / len(fair) if len(fair) else cost_tokens)
        ahead = fair.tokens_ahead(org_id, cost_tokens, front=front, before=before, extra=held_tokens)
        return round(ahead / mean_cost)

    def flex_newest_first(self) -> Iterator[Waiter]:
        """Flex waiters from the last to join (for shedding those that cannot
        make their deadline). Stop iterating before removing any."""
        if not self.tiers_enabled:
            return iter(())
        return (w for w in self._fair[ServiceTier.FLEX].newest_first() if isinstance(w, Waiter))
