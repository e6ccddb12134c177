"""Engine slots shared by several gateways through a real Redis server
(``flexserve.shared.capacity``): each "gateway" a lease and a connection of
its own, told what it wants and runs, as its scheduler would tell it."""

from __future__ import annotations

import asyncio
import random

import pytest

from flexserve.scheduler.replicas import SlotAsk, SlotLease
from flexserve.shared.capacity import SharedSlots
from flexserve.shared.presence import Presence
from redis_server import Presences, flex_rooms, slot_leases

# Eight slots, six of them flex may fill (a headroom of two kept for default).
REPLICA, CAPACITY, FLEX_CAPACITY = "upstream:http://10.0.0.1:8000", 8, 6


class Gateway:
    """What one gateway's scheduler says about the replica, and its lease."""

    def __init__(self, presence: Presence) -> None:
        self.presence = presence
        self.redis = presence.redis
        # What it wants per organization (``want``: all of it for one).
        self.wants: dict[str, int] = {}
        self.lease = 0
        self.flex_room = 0
        # Of what it runs, the flex (or batch).
        self.flex_running = 0
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

    def demand(self) -> list[SlotAsk]:
        return [SlotAsk(REPLICA, CAPACITY, FLEX_CAPACITY, self.in_use, self.flex_running,
                        self.wants)]

    def grant(self, name: str, lease: SlotLease) -> None:
        assert name == REPLICA
        self.lease = lease.slots
        self.flex_room = lease.flex_room
        self.shares = lease.shares
        self.spread = lease.spread


@pytest.fixture
async def fleet(presences: Presences) -> list[Gateway]:
    return [Gateway(await presences.new(ttl=1.0)) for _ in range(3)]


async def leases_in_redis(gateway: Gateway) -> dict[str, int]:
    return slot_leases(await gateway.redis.hgetall(f"{gateway.presence.prefix}:slots:{REPLICA}"))


async def rooms_in_redis(gateway: Gateway) -> dict[str, int]:
    return flex_rooms(await gateway.redis.hgetall(f"{gateway.presence.prefix}:slots:{REPLICA}"))


async def held(gateway: Gateway) -> tuple[int, int]:
    """The lease and flex room ``gateway`` holds in Redis (its grants may be less)."""
    holder = gateway.presence.holder
    return ((await leases_in_redis(gateway)).get(holder, 0),
            (await rooms_in_redis(gateway)).get(holder, 0))


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
    assert await held(busy) == (8, 3)  # its eight still run (none of them flex)
    assert busy.lease == 4  # but it admits no more than its half
    busy.want = 3  # five of its runs ended
    await busy.slots.renew()
    await newcomer.slots.renew()
    # busy holds its three; its grant is 2 or 3 (the one slot over the
    # shares goes to whichever holder's name sorts first).
    assert (await held(busy))[0] == 3 and busy.lease in (2, 3)
    assert newcomer.lease == 5


async def test_a_dead_gateways_slots_come_back_within_its_lease(fleet: list[Gateway]) -> None:
    dying, survivor = fleet[0], fleet[1]
    dying.want = 8
    await dying.slots.renew()
    survivor.want = 8
    task = dying.presence._task
    assert task is not None
    task.cancel()  # killed: its presence is no longer renewed

    async def lapsed() -> bool:
        """Whether Redis, by its own clock, has the dead gateway's presence lapsed."""
        expires = await survivor.redis.zscore(dying.presence.gateways_key, dying.presence.holder)
        seconds, micros = await survivor.redis.time()
        return expires is None or expires <= seconds * 1000 + micros // 1000

    # Judged by Redis's clock, not the test's (a busy host slows the test's
    # loop, not the lease): slots held while the presence lives, given back
    # at the first renewal once it has lapsed.
    seen_lapsed = False
    for _ in range(400):
        await survivor.slots.renew()
        if survivor.lease == 8:
            break
        assert not seen_lapsed, "a renewal after the dead gateway's lease lapsed kept its slots"
        seen_lapsed = await lapsed()
        await asyncio.sleep(0.05)
    assert survivor.lease == 8, "the dead gateway's slots were never given back"
    assert await lapsed()


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


async def test_flex_rooms_never_sum_past_the_flex_capacity_and_none_is_lost(
    fleet: list[Gateway],
) -> None:
    """The headroom kept for default is the replica's: the gateways' flex
    rooms together never pass its capacity less that headroom, each stays
    within its lease and no lower than the flex it runs, and shared between
    two gateways no flex slot is lost to a headroom per lease (6, not 2 × 3)."""
    rng = random.Random(5)
    for _ in range(300):
        gateway = rng.choice(fleet)
        gateway.want = rng.choice([0, 1, 2, 5, 12])
        gateway.flex_running = rng.randint(0, min(gateway.in_use, gateway.flex_room))
        await gateway.slots.renew()
        assert sum((await rooms_in_redis(gateway)).values()) <= FLEX_CAPACITY
        lease, room = await held(gateway)
        assert gateway.flex_running <= room <= lease
        assert gateway.flex_room <= gateway.lease <= lease
    for gateway in fleet:
        gateway.want, gateway.flex_running = 0, 0
        await gateway.slots.renew()
    first, second = fleet[0], fleet[1]
    first.want = second.want = 4
    for _ in range(3):
        for gateway in fleet:
            await gateway.slots.renew()
    assert (first.lease, second.lease) == (4, 4)
    assert first.flex_room + second.flex_room == FLEX_CAPACITY


async def test_a_flex_room_shrinks_no_lower_than_the_flex_it_runs(fleet: list[Gateway]) -> None:
    alone, newcomer = fleet[0], fleet[1]
    alone.wants = {"org-a": 8}
    await alone.slots.renew()
    assert (alone.lease, alone.flex_room) == (8, 6)
    alone.running = alone.flex_running = 6  # as one gateway would: flex up to the headroom
    newcomer.wants = {"org-b": 4}
    await newcomer.slots.renew()
    assert (newcomer.lease, newcomer.flex_room) == (0, 0)  # nothing is free yet
    alone.wants = {"org-a": 6}
    await alone.slots.renew()
    assert await held(alone) == (6, 6)  # its six flex still run
    assert (alone.lease, alone.flex_room) == (4, 3)  # but it starts no more than its part
    await newcomer.slots.renew()
    assert (newcomer.lease, newcomer.flex_room) == (2, 0)
    alone.running, alone.flex_running = 4, 2  # four of them ended, two default started
    alone.wants = {"org-a": 4}
    await alone.slots.renew()
    await newcomer.slots.renew()
    assert (alone.lease, alone.flex_room) == (4, 3)  # half the lease: half the room
    assert (newcomer.lease, newcomer.flex_room) == (4, 3)


async def test_an_organizations_part_is_split_over_its_gateways_max_min_not_by_backlog(
    fleet: list[Gateway],
) -> None:
    """One organization asks on two gateways for more than half the engine
    each: each gets half, however their backlogs compare (split in
    proportion, 30 against 10 waiting would give 6 and 2, and each change
    in the backlogs would move slots from one gateway to the other: the
    default requests of the one that lost them then preempt its flex)."""
    first, second = fleet[0], fleet[1]
    first.running = second.running = 0
    for wants in ((30, 10), (10, 30), (25, 5)):
        first.want, second.want = wants
        for _ in range(3):
            for gateway in (first, second):
                await gateway.slots.renew()
        assert (first.lease, second.lease) == (4, 4), wants
        assert first.shares == second.shares == {"org-1": 4.0}
    # One that asks for less than half gets what it asks; the other the rest.
    first.want, second.want = 30, 2
    for _ in range(3):
        for gateway in (first, second):
            await gateway.slots.renew()
    assert (first.lease, second.lease) == (6, 2)
