"""Replicas and the pools of replicas that serve one model."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexserve.engines.base import Engine, EngineLoad
from flexserve.scheduler.queue import TierQueue
from flexserve.tiers import ServiceTier


@dataclass(eq=False)
class Replica:
    """One engine replica and what the gateway has in flight on it."""

    engine: Engine
    # Sequences the gateway runs on this replica at once.
    capacity: int
    num_in_flight: int = 0
    num_in_flight_by_tier: dict[ServiceTier, int] = field(
        default_factory=lambda: {tier: 0 for tier in ServiceTier}
    )
    load: EngineLoad = field(default_factory=EngineLoad)
    healthy: bool = True

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def free_slots(self) -> int:
        return self.capacity - self.num_in_flight

    def take(self, tier: ServiceTier) -> None:
        self.num_in_flight += 1
        self.num_in_flight_by_tier[tier] += 1

    def give_back(self, tier: ServiceTier) -> None:
        self.num_in_flight -= 1
        self.num_in_flight_by_tier[tier] -= 1


@dataclass(eq=False)
class ModelPool:
    """The replicas serving one model id, and the requests waiting for them."""

    model: str
    replicas: list[Replica]
    queue: TierQueue = field(default_factory=TierQueue)

    def least_loaded(self) -> Replica | None:
        """The healthy replica with the most free slots, if any has one."""
        best: Replica | None = None
        for replica in self.replicas:
            if replica.healthy and replica.free_slots > 0:
                if best is None or replica.free_slots > best.free_slots:
                    best = replica
        return best

    @property
    def capacity(self) -> int:
        return sum(r.capacity for r in self.replicas if r.healthy)

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.replicas)
