"""The gateway's waiting queue: one heap ordered by ``(tier_rank, arrival, seq)``.

Entries are removed lazily: a waiter that leaves (client gone, deadline
passed) is marked and skipped when it reaches the head, so leaving is O(1)
and the heap is never rewritten.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field

from flexserve.tiers import ServiceTier


@dataclass(eq=False, slots=True)
class Waiter:
    """A request waiting for room on a replica of its model."""

    tier: ServiceTier
    org_id: str
    # Tokens this request is expected to cost (prompt + max output), for fairness.
    cost_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    # Set by the scheduler when a replica is granted; cancelled when the waiter leaves.
    future: asyncio.Future[object] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    seq: int = 0
    # False once the waiter has left the queue (granted, or gone).
    queued: bool = True

    def sort_key(self) -> tuple[int, float, int]:
        return (self.tier.rank, self.arrival, self.seq)


class TierQueue:
    """Waiters by tier rank, then arrival; FIFO within a tier."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, float, int], Waiter]] = []
        self._seq = itertools.count()
        self._num_by_tier = {tier: 0 for tier in ServiceTier}

    def __len__(self) -> int:
        return sum(self._num_by_tier.values())

    def num_waiting(self, tier: ServiceTier | None = None) -> int:
        return len(self) if tier is None else self._num_by_tier[tier]

    def push(self, waiter: Waiter) -> None:
        waiter.seq = next(self._seq)
        waiter.queued = True
        self._num_by_tier[waiter.tier] += 1
        heapq.heappush(self._heap, (waiter.sort_key(), waiter))

    def remove(self, waiter: Waiter) -> None:
        """Take a waiter out (lazily: its heap entry is skipped later)."""
        if waiter.queued:
            waiter.queued = False
            self._num_by_tier[waiter.tier] -= 1

    def peek(self) -> Waiter | None:
        self._drop_stale()
        return self._heap[0][1] if self._heap else None

    def pop(self) -> Waiter | None:
        self._drop_stale()
        if not self._heap:
            return None
        _, waiter = heapq.heappop(self._heap)
        self.remove(waiter)
        return waiter

    def _drop_stale(self) -> None:
        while self._heap and not self._heap[0][1].queued:
            heapq.heappop(self._heap)
