"""Flex pacing (``flex_start_interval``): flex starts on a replica at most
one per wall-clock slot, and gateways that share the replica take the slots
in turn, so that flex prompts do not pile into one engine step."""

from __future__ import annotations

import asyncio
import time

import pytest

from flexserve.engines.base import EngineLoad
from flexserve.scheduler.policy import (
    SchedulerConfig,
    can_admit,
    flex_slot,
    flex_turn_open,
    next_flex_turn,
    spare_capacity,
)
from flexserve.scheduler.replicas import Replica, SlotLease
from flexserve.tiers import ServiceTier
from test_scheduler import ScriptedEngine, make_scheduler, run

INTERVAL = 0.2


def test_one_flex_start_per_slot_and_only_in_the_gateways_turn() -> None:
    config = SchedulerConfig(flex_start_interval=INTERVAL)
    replica = Replica(ScriptedEngine(8), 8)
    # Alone: every slot is its turn, once.
    assert flex_turn_open(config, replica, 10.0)
    replica.flex_started_slot = 50  # started flex in the slot [10.0, 10.2)
    assert not flex_turn_open(config, replica, 10.1)
    assert next_flex_turn(config, replica, 10.1) == pytest.approx(0.1)
    assert flex_turn_open(config, replica, 10.25)
    # Second of three gateways: slots 49, 52, 55, ...
    replica.flex_turn, replica.flex_started_slot = (1, 3), -1
    opened = [slot for slot in range(48, 56) if flex_turn_open(config, replica, slot * INTERVAL + 0.01)]
    assert opened == [49, 52, 55]
    assert next_flex_turn(config, replica, 50 * INTERVAL + 0.05) == pytest.approx(2 * INTERVAL - 0.05)
    # Out of its turn flex waits; default and priority are never paced.
    # (Slots of 10^9 s: the one now lasts past the test.)
    ages = SchedulerConfig(flex_start_interval=1e9)
    now = time.monotonic()
    replica.load = EngineLoad(updated_at=now)
    replica.flex_turn = ((flex_slot(ages, time.time()) + 1) % 2, 2)
    assert not can_admit(ages, replica, ServiceTier.FLEX, now)
    assert can_admit(ages, replica, ServiceTier.DEFAULT, now)
    assert can_admit(ages, replica, ServiceTier.PRIORITY, now)
    # Waiting for a turn is not a lack of room: flex status still reports it spare.
    assert spare_capacity(ages, [replica], now) > 0
    replica.flex_turn = (flex_slot(ages, time.time()) % 2, 2)
    assert can_admit(ages, replica, ServiceTier.FLEX, now)


async def test_queued_flex_starts_one_per_slot_without_waiting_for_a_load_read() -> None:
    """Three flex requests at once start in three slots, the later ones at
    the turns the scheduler wakes itself for: its load reads (every 30 s
    here) would come too late."""
    engine = ScriptedEngine(capacity=8, token_time=0.001)
    started: list[float] = []
    generate = engine.generate

    def timed(request, control=None):  # type: ignore[no-untyped-def]
        started.append(time.time())
        return generate(request, control)

    engine.generate = timed  # type: ignore[method-assign]
    scheduler = await make_scheduler(engine, flex_start_interval=INTERVAL, scrape_interval=30.0)
    try:
        runs = [run(scheduler, f"f{i}", ServiceTier.FLEX, tokens=2) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*runs), timeout=10)
        assert [text for _, text in results] == ["x x "] * 3
        assert len(started) == 3
        # Three slots: the first and last start at least a slot apart (less
        # the moments between a release and the engine's first call).
        assert max(started) - min(started) >= INTERVAL / 2
    finally:
        await scheduler.close()


async def test_a_lease_gives_the_gateway_its_turn() -> None:
    engine = ScriptedEngine(capacity=4)
    engine.shared = True
    scheduler = await make_scheduler(engine, flex_start_interval=INTERVAL)
    try:
        [ask] = scheduler.slot_demand()
        scheduler.lease(ask.replica, SlotLease(4, 3, {}, set(), turn=(2, 3)))
        [replica] = scheduler.replicas()
        assert replica.flex_turn == (2, 3)
    finally:
        await scheduler.close()
