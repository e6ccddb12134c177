"""Budgets shared by several gateways through a real Redis server
(``flexserve.shared``): each "gateway" here is a lease and a ``RedisBudgets``
on a connection of its own, as separate processes would have."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from flexserve.billing.budget import BudgetExceeded, Budgets, LocalBudgets, month_of
from flexserve.errors import ServiceUnavailableError
from flexserve.shared.budgets import RedisBudgets
from redis_server import Presences, RedisServer

ORG = "org:org-shared"


class Gateways:
    """Gateways' budgets in one Redis, each on a lease and connection of its own."""

    def __init__(self, presences: Presences) -> None:
        self.presences = presences
        self._open: list[RedisBudgets] = []

    async def start(self, ttl: float = 15.0, limits: dict[str, int] | None = None,
                    timeout: float = 5.0) -> RedisBudgets:
        budgets = RedisBudgets(await self.presences.new(ttl=ttl, timeout=timeout))
        budgets.set_limits(limits or {})
        await budgets.start()
        self._open.append(budgets)
        return budgets

    async def close(self) -> None:
        for budgets in reversed(self._open):
            await budgets.close()


@pytest.fixture
async def gateways(presences: Presences) -> AsyncIterator[Gateways]:
    made = Gateways(presences)
    yield made
    await made.close()


async def spend_concurrently(
    budgets: list[Budgets], limit: int, max_each: int, flush: Callable[[], Awaitable[int]],
) -> tuple[int, int]:
    """Requests on every gateway at once (each holds ``max_each``, costs up to
    it, takes a few ms) until every gateway has been refused 20 times; the
    month's spend as ``flush`` reads it after, and the sum of the costs settled."""
    rng = random.Random(7)
    settled = 0

    async def worker(gateway: Budgets) -> None:
        nonlocal settled
        refusals = 0
        while refusals < 20:
            try:
                hold = await gateway.reserve([ORG], max_each)
            except BudgetExceeded:
                refusals += 1
                await asyncio.sleep(0.001)
                continue
            await asyncio.sleep(rng.uniform(0, 0.004))
            cost = rng.randint(max_each // 2, max_each)
            gateway.settle(hold, cost)
            settled += cost

    for gateway in budgets:
        gateway.set_limits({ORG: limit})
    await asyncio.gather(*(worker(g) for g in budgets for _ in range(8)))
    return await flush(), settled


async def test_gateways_sharing_redis_overspend_by_at_most_one_hold(gateways: Gateways) -> None:
    limit, max_each = 40_000, 700
    shared = [await gateways.start() for _ in range(3)]

    async def flush() -> int:
        for gateway in shared:
            await gateway.close()  # sends what is queued
        spent, held = await shared[0].committed(ORG)
        assert held == 0
        return spent

    spent, settled = await spend_concurrently(list(shared), limit, max_each, flush)
    # Exact: every cost settled is in the month's spend, once.
    assert spent == settled
    assert limit <= spent <= limit + max_each


async def test_gateways_each_with_budgets_of_their_own_overspend_by_far() -> None:
    """What the shared budgets are for: the same load on three gateways that
    each keep their own (one gateway's design) spends up to three budgets."""
    limit, max_each = 40_000, 700
    local = [LocalBudgets() for _ in range(3)]

    async def flush() -> int:
        return sum(budget.spent(ORG) for budget in local)

    spent, settled = await spend_concurrently(list(local), limit, max_each, flush)
    assert spent == settled
    assert spent > 2 * limit


async def test_a_dead_gateways_holds_come_back_within_its_lease(gateways: Gateways) -> None:
    ttl = 1.0
    dying = await gateways.start(ttl=ttl, limits={ORG: 1000})
    survivor = await gateways.start(ttl=ttl, limits={ORG: 1000})
    await dying.reserve([ORG], 1000, whole=True)
    with pytest.raises(BudgetExceeded):
        await survivor.reserve([ORG], 1)
    # Killed: it neither renews its lease nor settles (kill -9).
    task = dying._presence._task
    assert task is not None
    task.cancel()
    died = time.monotonic()
    while True:
        try:
            await survivor.reserve([ORG], 1)
            break
        except BudgetExceeded:
            assert time.monotonic() - died < ttl + 1.0, "the dead gateway's hold was never given back"
            await asyncio.sleep(0.02)
    assert time.monotonic() - died >= ttl / 2  # not before its lease could have lapsed


async def test_a_lapsed_lease_does_not_take_from_holds_made_since(
    gateways: Gateways, redis_server: RedisServer
) -> None:
    budgets = await gateways.start(limits={ORG: 10_000})
    presence = budgets._presence
    old = await budgets.reserve([ORG], 300)
    # It stalled past its TTL: another gateway dropped its lease and holds.
    async with Redis.from_url(redis_server.url) as other:
        await other.zrem(presence.gateways_key, presence.holder)
        await other.delete(presence.held_key(presence.holder))
    new = await budgets.reserve([ORG], 500)  # finds the lease gone, takes a new one
    assert new.holder != old.holder
    budgets.settle(old, 200)
    await budgets.close()
    assert await budgets.committed(ORG) == (200, 500)


async def test_a_batch_hold_is_carved_without_a_round_trip_while_it_lasts(gateways: Gateways) -> None:
    budgets = await gateways.start(limits={ORG: 1000})
    hold = await budgets.reserve([ORG], 600, whole=True)
    first = await budgets.carve(hold, 400)
    second = await budgets.carve(hold, 400)  # 200 from the hold, 200 afresh
    assert (first.amount, second.amount, hold.amount) == (400, 400, 0)
    assert await budgets.committed(ORG) == (0, 800)
    budgets.settle(first, 100)
    budgets.settle(second, 150)
    budgets.release(hold)
    await budgets.close()
    assert await budgets.committed(ORG) == (250, 0)


async def test_settlements_wait_out_redis_being_away(
    gateways: Gateways, redis_server: RedisServer
) -> None:
    budgets = await gateways.start(limits={ORG: 10_000}, timeout=1.0)
    hold = await budgets.reserve([ORG], 400)
    redis_server.pause()
    try:
        started = time.monotonic()
        budgets.settle(hold, 321)  # queued: never blocks the request's end
        assert time.monotonic() - started < 0.01
        with pytest.raises(ServiceUnavailableError) as refused:
            await budgets.reserve([ORG], 1)
        assert refused.value.code == "shared_state_unavailable"
        await asyncio.sleep(1.5)  # the sender fails and keeps the settlement
    finally:
        redis_server.resume()
    deadline = time.monotonic() + 10
    while await budgets.committed(ORG) != (321, 0):
        assert time.monotonic() < deadline, await budgets.committed(ORG)
        await asyncio.sleep(0.05)


async def test_start_raises_the_spend_to_the_ledgers(gateways: Gateways) -> None:
    first = await gateways.start()
    first.settle(await first.reserve([ORG], 50), 50)
    await first.close()
    month = month_of(time.time())
    for ledger, expected in ((30, 50), (90, 90)):
        budgets = RedisBudgets(first._presence)
        budgets.load_spent(month, {ORG: ledger})
        await budgets.start()
        assert (await budgets.committed(ORG))[0] == expected
        await budgets.close()


async def test_a_scope_without_a_budget_takes_no_hold_but_its_cost_counts(
    gateways: Gateways, redis_server: RedisServer
) -> None:
    budgets = await gateways.start(limits={"org:org-capped": 100}, timeout=1.0)
    redis_server.pause()
    try:
        hold = await asyncio.wait_for(budgets.reserve([ORG], 70), 0.5)  # no round trip
        budgets.settle(hold, 60)
    finally:
        redis_server.resume()
    await budgets.close()
    assert await budgets.committed(ORG) == (60, 0)
    # Set a budget: the spend so far counts against it.
    budgets.set_limits({ORG: 100})
    await budgets.start()
    with pytest.raises(BudgetExceeded):
        await budgets.reserve([ORG], 50, whole=True)


async def test_a_hold_made_where_no_scope_had_a_budget_is_carved_like_any(gateways: Gateways) -> None:
    """A batch's hold taken before its organization had a budget holds nothing
    in Redis; carving it still moves its amount down one line at a time."""
    budgets = await gateways.start()
    hold = await budgets.reserve([ORG], 600, whole=True)
    assert hold.parts == ()
    first = await budgets.carve(hold, 200)
    assert (first.amount, hold.amount) == (200, 400)
    budgets.set_limits({ORG: 10_000})
    second = await budgets.carve(hold, 500)  # 400 from the hold, 100 held afresh
    assert (second.amount, hold.amount) == (500, 0)
    assert await budgets.committed(ORG) == (0, 100)
