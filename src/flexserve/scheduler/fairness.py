"""Fairness inside a tier: deficit round robin by tokens across organizations.

Each organization has a FIFO flow of waiters. Organizations take turns; on its
turn an organization's deficit grows by ``quantum`` tokens and its waiters are
released while their expected cost fits the deficit. One organization's
100,000-request evaluation therefore gets the same token share as another's
10-request job, not 10,000 times more.

Removal is lazy (a waiter that leaves is marked and skipped), so leaving is
O(1) for any of thousands of waiting connections.

Across organizations the queue also keeps every waiter in the order it
joined, so that a pass looking for the waiters that can no longer make their
deadline can walk from the newest and stop at the first that still can,
instead of sorting them all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Protocol


class FairWaiter(Protocol):
    org_id: str
    cost_tokens: int
    arrival: float
    queued: bool


class FairQueue:
    """Deficit round robin over per-organization FIFO flows."""

    def __init__(self, quantum: int = 2048) -> None:
        if quantum < 1:
            raise ValueError("quantum must be at least one token")
        self.quantum = quantum
        # Each organization's share of a turn's quantum (1 where not given):
        # where gateways share engines, what makes the organizations' shares
        # across all gateways fair (``flexserve.shared.capacity``).
        self.weights: dict[str, float] = {}
        self._flows: dict[str, deque[FairWaiter]] = {}
        self._deficit: dict[str, int] = {}
        # Organizations with waiters, in turn order; the first one has the turn.
        self._turns: deque[str] = deque()
        # The organization whose turn has started (its quantum already added).
        self._turn_of: str | None = None
        self._num_waiting = 0
        # Expected tokens waiting, in all and per organization (for wait estimates).
        self.num_tokens = 0
        self._tokens: dict[str, int] = {}
        # Every waiter in the order it joined (preempted work back at the front).
        # Waiters that left are dropped at either end at once, and from the
        # middle when they make up half of it (amortised O(1) per leave).
        self._order: deque[FairWaiter] = deque()

    def __len__(self) -> int:
        return self._num_waiting

    def push(self, waiter: FairWaiter, *, front: bool = False, in_place: bool = False) -> None:
        """Queue a waiter at the back of its organization's flow (or the front,
        for work that was preempted and goes back to where it stood; or, ``in_place``,
        behind the waiters that arrived before it, for a place that was held)."""
        flow = self._flows.get(waiter.org_id)
        if flow is None:
            flow = self._flows[waiter.org_id] = deque()
            self._deficit[waiter.org_id] = 0
            self._turns.append(waiter.org_id)
        if front:
            flow.appendleft(waiter)
            self._order.appendleft(waiter)
        elif in_place:
            _insert_by_arrival(flow, waiter)
            _insert_by_arrival(self._order, waiter)
        else:
            flow.append(waiter)
            self._order.append(waiter)
        waiter.queued = True
        self._num_waiting += 1
        self.num_tokens += waiter.cost_tokens
        self._tokens[waiter.org_id] = self._tokens.get(waiter.org_id, 0) + waiter.cost_tokens

    def remove(self, waiter: FairWaiter) -> None:
        if not waiter.queued:
            return
        waiter.queued = False
        self._num_waiting -= 1
        self.num_tokens -= waiter.cost_tokens
        left = self._tokens[waiter.org_id] - waiter.cost_tokens
        if left > 0:
            self._tokens[waiter.org_id] = left
        else:
            del self._tokens[waiter.org_id]
        order = self._order
        while order and not order[-1].queued:
            order.pop()
        while order and not order[0].queued:
            order.popleft()
        if len(order) > 2 * self._num_waiting + 64:
            self._order = deque(w for w in order if w.queued)

    def peek(self) -> FairWaiter | None:
        """The waiter deficit round robin releases next (not removed)."""
        while self._turns:
            org = self._turns[0]
            flow = self._flows[org]
            while flow and not flow[0].queued:
                flow.popleft()
            if not flow:
                self._drop_flow(org)
                continue
            if self._turn_of != org:
                self._turn_of = org
                self._deficit[org] += max(1, round(self.quantum * self.weights.get(org, 1.0)))
            head = flow[0]
            if head.cost_tokens <= self._deficit[org]:
                return head
            # Not enough deficit: the turn passes, the deficit is kept.
            self._turns.rotate(-1)
            self._turn_of = None
        return None

    def pop(self) -> FairWaiter | None:
        head = self.peek()
        if head is None:
            return None
        org = head.org_id
        self._flows[org].popleft()
        self._deficit[org] -= head.cost_tokens
        self.remove(head)
        return head

    def _drop_flow(self, org: str) -> None:
        # An emptied flow forfeits its deficit, as in DRR: idle time earns no credit.
        self._turns.popleft()
        del self._flows[org]
        del self._deficit[org]
        if self._turn_of == org:
            self._turn_of = None

    def tokens_ahead(
        self, org_id: str, cost_tokens: int, *, front: bool = False, before: float | None = None,
        extra: int = 0,
    ) -> int:
        """Tokens released before a waiter of ``cost_tokens`` that ``org_id``
        queues now: its own flow ahead of it (none at the ``front``; the
        waiters that arrived ``before``, for one put in place), ``extra``
        more of its own, and what every other organization releases in the
        turns it needs, at most ``quantum`` tokens a turn."""
        if front:
            own = extra
        elif before is None or _arrived_before(self._flows.get(org_id), before):
            own = self._tokens.get(org_id, 0) + extra
        else:
            flow = self._flows[org_id]
            own = extra + sum(w.cost_tokens for w in flow if w.queued and w.arrival < before)
        turns = max(1, -(-(own + cost_tokens) // self.quantum))
        budget = turns * self.quantum
        return own + sum(min(tokens, budget) for org, tokens in self._tokens.items() if org != org_id)

    def newest_first(self) -> Iterator[FairWaiter]:
        """Every waiting waiter, the last to join first. Stop iterating before
        removing any: the order changes as waiters leave."""
        return (waiter for waiter in reversed(self._order) if waiter.queued)


def _arrived_before(flow: deque[FairWaiter] | None, moment: float) -> bool:
    """Whether the whole flow (kept in arrival order) arrived before ``moment``."""
    return not flow or flow[-1].arrival < moment


def _insert_by_arrival(line: deque[FairWaiter], waiter: FairWaiter) -> None:
    """Put ``waiter`` behind every waiter of ``line`` that arrived before it
    (held places come back near the front: searched from there)."""
    for index, other in enumerate(line):
        if other.arrival > waiter.arrival:
            line.insert(index, waiter)
            return
    line.append(waiter)
