"""The scheduler: queues requests by tier and releases them onto replicas.

The API hands the scheduler a ``Ticket`` and an ``EngineRequest`` and iterates
``Scheduler.stream``: the scheduler waits for room (woken by futures, never by
polling), runs the generation on a replica, and gives the room back however
the generation ends. What happened is written back on the ticket (served
tier, queue time, replica) for the response and the usage record.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from flexserve.engines.base import Delta, Engine, EngineRequest, SequenceControl
from flexserve.errors import EngineUnavailableError, ModelNotFoundError
from flexserve.scheduler.queue import Waiter
from flexserve.scheduler.replicas import ModelPool, Replica
from flexserve.tiers import ServiceTier


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's passage through the scheduler."""

    request_id: str
    model: str
    tier: ServiceTier
    org_id: str
    # Expected prompt + output tokens, for fair shares and wait estimates.
    cost_tokens: int = 0
    # Filled in by the scheduler:
    served_tier: ServiceTier | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    replica_name: str | None = None

    @property
    def queue_time(self) -> float:
        if self.admitted_at is None:
            return time.monotonic() - self.enqueued_at
        return self.admitted_at - self.enqueued_at


class Scheduler:
    """Per-model tier queues in front of a set of replicas."""

    def __init__(self, pools: dict[str, ModelPool]) -> None:
        self._pools = pools

    @classmethod
    def from_engines(cls, engines: list[Engine], capacity: dict[Engine, int] | None = None) -> Scheduler:
        """Group started engines into one pool per model they serve."""
        pools: dict[str, ModelPool] = {}
        replicas = {e: Replica(e, (capacity or {}).get(e, e.capacity)) for e in engines}
        for engine, replica in replicas.items():
            for card in engine.models():
                pool = pools.setdefault(card.id, ModelPool(card.id, []))
                pool.replicas.append(replica)
        return cls(pools)

    @property
    def pools(self) -> dict[str, ModelPool]:
        return self._pools

    def pool(self, model: str) -> ModelPool:
        try:
            return self._pools[model]
        except KeyError:
            raise ModelNotFoundError(model) from None

    async def stream(self, ticket: Ticket, request: EngineRequest) -> AsyncIterator[Delta]:
        """Admit the ticket, run it, and yield its deltas."""
        pool = self.pool(ticket.model)
        replica = await self._admit(pool, ticket)
        control = SequenceControl()
        try:
            async for delta in replica.engine.generate(request, control):
                yield delta
        finally:
            self._release(pool, replica, ticket)

    async def _admit(self, pool: ModelPool, ticket: Ticket) -> Replica:
        if not any(r.healthy for r in pool.replicas):
            raise EngineUnavailableError(f"No healthy replica serves `{ticket.model}` right now.")
        replica = pool.least_loaded() if pool.queue.peek() is None else None
        if replica is None:
            waiter = Waiter(ticket.tier, ticket.org_id, ticket.cost_tokens)
            pool.queue.push(waiter)
            try:
                granted = await waiter.future
            except BaseException:
                pool.queue.remove(waiter)
                if waiter.future.done() and not waiter.future.cancelled():
                    # Granted at the same moment the waiter left: hand the room on.
                    lost = waiter.future.result()
                    assert isinstance(lost, Replica)
                    lost.give_back(ticket.tier)
                    self._dispatch(pool)
                raise
            assert isinstance(granted, Replica)
            replica = granted
        else:
            replica.take(ticket.tier)
        ticket.admitted_at = time.monotonic()
        ticket.served_tier = ticket.tier
        ticket.replica_name = replica.name
        return replica

    def _release(self, pool: ModelPool, replica: Replica, ticket: Ticket) -> None:
        replica.give_back(ticket.served_tier or ticket.tier)
        self._dispatch(pool)

    def _dispatch(self, pool: ModelPool) -> None:
        """Hand free room to the waiters at the head of the queue."""
        while True:
            waiter = pool.queue.peek()
            if waiter is None:
                return
            replica = pool.least_loaded()
            if replica is None:
                return
            pool.queue.pop()
            if waiter.future.done():
                continue
            replica.take(waiter.tier)
            waiter.future.set_result(replica)

    def queue_depth(self, model: str, tier: ServiceTier | None = None) -> int:
        return self._pools[model].queue.num_waiting(tier)
