"""Engine slots shared by several gateways through a real Redis server
(``flexserve.shared.capacity``): each "gateway" a lease and a connection of
its own, told what it wants and runs, as its scheduler would tell it."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from flexserve.shared.capacity import SharedSlots
from flexserve.shared.presence import Presence
from redis_server import Presences

REPLICA, CAPACITY = "upstream:http://10.0.0.1:8000", 8


class Gateway:
    """What one gateway's scheduler says about the replica, and its lease."""

    def __init__(self, presence: Presence) -> None:
        self.presence = presence
        self.redis = presence.redis
        # What it wants per organization (``want``: all of it for one).
        self.wants: dict[str, int] = {}
        self.lease = 0
        self.shares: dict[str, float] = {}
        self.running: int | None = None
        self.spread: set[str] = set()
        self.slots = SharedSlots(presence, self.demand, self.grant, interval=3600)

    @property
    def want(self) -> int:
        return sum(self.wants.values())

    @want.setter
    def want(self, value: int) -> None:
        self.wants = {"org-1": value}

    @property
    def in_use(self) -> int:
        # It runs what it wants, as far as its lease lets it (unless a test
        # says what it runs).
        return min(self.want, self.lease) if self.running is None else self.running

    def demand(self) -> list[tuple[str, int, int, dict[str, int]]]:
        return [(REPLICA, CAPACITY, self.in_use, self.wants)]

    def grant(self, name: str, slots: int, shares: dict[str, float], spread: set[str]) -> None:
        assert name == REPLICA
        self.lease = slots
        self.shares = shares
        self.spread = spread


@pytest.fixture
async def fleet(presences: Presences) -> list[Gateway]:
    return [Gateway(await presences.new(ttl=1.0)) for _ in range(3)]


async def leases_in_redis(gateway: Gateway) -> dict[str, int]:
    stored = await gateway.redis.hgetall(f"{gateway.presence.prefix}:slots:{REPLICA}")
    return {k.decode(): int(v) for k, v in stored.items() if not k.endswith(b":want")}


async def test_leases_never_sum_past_the_capacity_and_follow_demand(fleet: list[Gateway]) -> None:
    rng = random.Random(3)
    for _ in range(300):
        gateway = rng.choice(fleet)
        gateway.want = rng.choice([0, 1, 2, 5, 12])
        await gateway.slots.renew()
        assert sum((await leases_in_redis(gateway)).values()) <= CAPACITY
        assert all(g.in_use <= g.lease for g in fleet)
    # Steady demand: max-min fair, the rest spread evenly.
    for gateway, want in zip(fleet, (12, 2, 0), strict=True):
        gateway.wants = {f"org-{want}": want}
    for _ in range(3):
        for gateway in fleet:
            await gateway.slots.renew()
    assert [g.lease for g in fleet] == [6, 2, 0]
    fleet[0].wants = {}  # the busy one falls idle: the six spare spread for bursts
    for _ in range(2):
        for gateway in fleet:
            await gateway.slots.renew()
    assert [g.lease for g in fleet] == [2, 2 + 2, 2]


async def test_a_lease_shrinks_no_lower_than_what_runs(fleet: list[Gateway]) -> None:
    busy, newcomer = fleet[0], fleet[1]
    busy.want = 8
    await busy.slots.renew()
    assert busy.lease == 8 and busy.in_use == 8
    newcomer.want = 8
    await newcomer.slots.renew()
    assert newcomer.lease == 0  # nothing is free yet
    await busy.slots.renew()
    assert busy.lease == 8  # its eight still run
    busy.want = 3  # five of its runs ended
    await busy.slots.renew()
    await newcomer.slots.renew()
    assert (busy.lease, newcomer.lease) == (3, 5)


async def test_a_dead_gateways_slots_come_back_within_its_lease(fleet: list[Gateway]) -> None:
    dying, survivor = fleet[0], fleet[1]
    dying.want = 8
    await dying.slots.renew()
    survivor.want = 8
    task = dying.presence._task
    assert task is not None
    task.cancel()  # killed: its presence is no longer renewed
    died = time.monotonic()
    while True:
        await survivor.slots.renew()
        if survivor.lease == 8:
            break
        assert time.monotonic() - died < 2.0, "the dead gateway's slots were never given back"
        await asyncio.sleep(0.05)
    assert time.monotonic() - died >= 0.5


async def test_an_organization_on_two_gateways_gets_its_part_not_a_part_on_each(
    fleet: list[Gateway],
) -> None:
    """A asks for 8 slots on each of two gateways, B for 8 on the first: each
    organization's part is half the engine's 8, A's split over its two
    gateways; the first gateway's turns give B twice A's share."""
    both, other = fleet[0], fleet[1]
    both.wants = {"org-a": 8, "org-b": 8}
    other.wants = {"org-a": 8}
    both.running = other.running = 0  # nothing has started yet
    for _ in range(3):
        for gateway in (both, other):
            await gateway.slots.renew()
    assert (both.lease, other.lease) == (6, 2)
    assert both.shares == {"org-a": 2.0, "org-b": 4.0}
    assert other.shares == {"org-a": 2.0}
    assert both.spread == other.spread == {"org-a"}
