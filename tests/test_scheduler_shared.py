"""The scheduler on replicas it shares with other gateways
(``flexserve.shared``): the slot leases it is given, the flex room they
leave it, its part of the room an engine reading shows free, and the work
other gateways have there. The engine is the scripted one of
test_scheduler.py, not a mock; the leases are handed in as the shared
script would hand them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from flexserve.config import ConfigError, load_settings
from flexserve.engines.base import EngineLoad
from flexserve.engines.upstream import UpstreamEngine
from flexserve.scheduler.placement import pick_replica
from flexserve.scheduler.policy import PACK_RESERVE_HOLD, SchedulerConfig, can_admit, shared_flex_starts
from flexserve.scheduler.replicas import ModelPool, Replica, Running, SlotLease
from flexserve.tiers import ServiceTier
from test_scheduler import ScriptedEngine, first_and_second, make_scheduler, run, until


async def test_asking_for_a_lease_holds_admission_to_what_runs_until_the_answer() -> None:
    """Where gateways lease a replica's slots, a lease may come back shrunk
    to what ran when it was asked for: nothing is admitted in between."""
    engine = ScriptedEngine(capacity=4, token_time=0.01)
    engine.shared = True  # a replica at a URL, as other gateways see it
    scheduler = await make_scheduler(engine)
    running = [asyncio.create_task(run(scheduler, f"r{i}", ServiceTier.DEFAULT, tokens=200))
               for i in range(2)]
    await until(lambda: len(engine.started) == 2)
    [ask] = scheduler.slot_demand()
    assert (ask.capacity, ask.flex_capacity, ask.in_use, ask.flex_in_use, ask.wants) == (
        4, 3, 2, 0, {"org-a": 2})
    late = asyncio.create_task(run(scheduler, "late", ServiceTier.DEFAULT))
    await asyncio.sleep(0.05)
    assert engine.started == ["r0", "r1"]  # held while the lease is asked for
    scheduler.lease(ask.replica, SlotLease(3, 2, {"org-a": 3.0}, set()))
    await until(lambda: "late" in engine.started)
    for task in [*running, late]:
        task.cancel()
    await asyncio.gather(*running, late, return_exceptions=True)
    await scheduler.close()


async def test_default_arriving_while_a_lease_is_renewed_waits_for_it_and_preempts_nothing() -> None:
    """A full replica's lease being renewed holds admission; a default
    arriving then waits for the answer rather than abort flex for a slot
    the answer may give it."""
    engine = ScriptedEngine(capacity=2, token_time=0.01)
    engine.shared = True
    scheduler = await make_scheduler(engine)
    [ask] = scheduler.slot_demand()
    scheduler.lease(ask.replica, SlotLease(1, 1, {}, set()))
    flex = asyncio.create_task(run(scheduler, "f0", ServiceTier.FLEX, tokens=400))
    await until(lambda: engine.started == ["f0"])
    [ask] = scheduler.slot_demand()
    default = asyncio.create_task(run(scheduler, "d0", ServiceTier.DEFAULT, tokens=5))
    await asyncio.sleep(0.05)
    [pool] = scheduler._pools.values()
    assert (engine.started, pool.num_preemptions) == (["f0"], 0)
    scheduler.lease(ask.replica, SlotLease(2, 1, {}, set()))
    await until(lambda: "d0" in engine.started)
    assert pool.num_preemptions == 0
    for task in (flex, default):
        task.cancel()
    await asyncio.gather(flex, default, return_exceptions=True)
    await scheduler.close()


async def test_flex_starts_only_below_the_flex_room_its_lease_gives() -> None:
    """Where gateways share a replica, the headroom kept for default is the
    replica's, not one per lease: flex starts below the room the lease
    gives (here 1 of a lease of 4), though one gateway alone would start 3."""
    engine = ScriptedEngine(capacity=4, token_time=0.01)
    engine.shared = True
    scheduler = await make_scheduler(engine)
    [ask] = scheduler.slot_demand()
    scheduler.lease(ask.replica, SlotLease(4, 1, {}, set()))
    flex = [asyncio.create_task(run(scheduler, f"f{i}", ServiceTier.FLEX, tokens=200))
            for i in range(3)]
    await until(lambda: len(engine.started) == 1)
    await asyncio.sleep(0.1)
    assert len(engine.started) == 1
    [ask] = scheduler.slot_demand()
    assert (ask.in_use, ask.flex_in_use) == (1, 1)
    scheduler.lease(ask.replica, SlotLease(4, 3, {}, set()))
    await until(lambda: len(engine.started) == 3)
    for task in flex:
        task.cancel()
    await asyncio.gather(*flex, return_exceptions=True)
    await scheduler.close()


async def test_flex_on_a_shared_replica_stays_out_of_the_headroom_other_gateways_defaults_fill() -> None:
    """A gateway's flex room counts its own runs only; other gateways'
    default runs on the replica count against no room of its own. Here it
    runs nothing on a 32-slot replica and its room is 8, but the engine
    reports 26 sequences: past the 25 below which flex starts on the replica
    (7 kept for default), so flex waits, and starts once the engine reports
    24. Default is not held back."""
    engine = ScriptedEngine(capacity=32, token_time=0.01)
    engine.shared = True
    scheduler = await make_scheduler(engine)
    replica = scheduler.replicas()[0]
    [ask] = scheduler.slot_demand()
    scheduler.lease(ask.replica, SlotLease(10, 8, {}, set()))
    engine.load = EngineLoad(num_running=26)
    await until(lambda: replica.load.num_running == 26)
    assert not can_admit(scheduler.config, replica, ServiceTier.FLEX, time.monotonic())
    assert can_admit(scheduler.config, replica, ServiceTier.DEFAULT, time.monotonic())
    flex = asyncio.create_task(run(scheduler, "f", ServiceTier.FLEX, tokens=2))
    await asyncio.sleep(0.1)
    assert engine.started == []
    engine.load = EngineLoad(num_running=24)
    await flex
    assert engine.started == ["f"]
    await scheduler.close()


def test_gateways_sharing_a_replica_each_start_their_part_of_the_flex_room_a_reading_shows() -> None:
    """The engine reports 13 of 32 sequences: 12 below the 25 flex may fill
    (7 kept for default). Three gateways read it, with flex rooms of 8, 8 and
    9 there. Each may start its part of the 12 (3.84, 3.84 and 4.32), rounded
    by the reading's draw, before the next reading: together 12 on average,
    where each taking all 12 would start 36. Its runs started before the
    engine was asked count in the reading, not again; those of them that
    end free room it refills alone; default is not held."""
    config = SchedulerConfig()
    now = time.monotonic()

    def gateway(room: int, draw: float) -> Replica:
        replica = Replica(ScriptedEngine(capacity=32), 32, flex_room=room, load_draw=draw,
                          load=EngineLoad(num_running=13, updated_at=now), load_asked_at=now - 0.01)
        return replica

    assert [shared_flex_starts(config, gateway(8, 0.0)), shared_flex_starts(config, gateway(8, 0.9))] == [3, 4]
    draws = [k / 1000 for k in range(1000)]
    mean = sum(shared_flex_starts(config, gateway(room, draw)) for room in (8, 8, 9) for draw in draws) / len(draws)
    assert mean == pytest.approx(12, abs=0.01)

    replica = gateway(8, 0.0)
    earlier = Running(ServiceTier.FLEX, "org-a", 100, stream=False)
    replica.add(earlier, now - 0.05)  # before the engine was asked: in its 13
    for _ in range(3):
        assert can_admit(config, replica, ServiceTier.FLEX, now)
        replica.add(Running(ServiceTier.FLEX, "org-a", 100, stream=False), now)
    assert replica.flex_started_since(replica.load_asked_at) == 3
    assert not can_admit(config, replica, ServiceTier.FLEX, now)
    assert can_admit(config, replica, ServiceTier.DEFAULT, now)
    # A run the reading counted ends: its room is this gateway's to refill.
    replica.discard(earlier)
    assert replica.load_ends == 1 and shared_flex_starts(config, replica) == 4
    assert can_admit(config, replica, ServiceTier.FLEX, now)
    replica.add(Running(ServiceTier.FLEX, "org-a", 100, stream=False), now)
    assert not can_admit(config, replica, ServiceTier.FLEX, now)
    # The next reading counts them: the room it shows is shared out anew.
    replica.load = EngineLoad(num_running=17, updated_at=now + 0.1)
    replica.load_asked_at, replica.load_ends = now + 0.09, 0
    assert shared_flex_starts(config, replica) == 2
    assert can_admit(config, replica, ServiceTier.FLEX, now + 0.1)
    # Over the room (other gateways' defaults): its own ends make that up first.
    replica.load = EngineLoad(num_running=27, updated_at=now + 0.2)
    replica.load_asked_at = now + 0.19
    assert shared_flex_starts(config, replica) == 0
    for ended in list(replica.running)[:3]:
        replica.discard(ended)
    assert shared_flex_starts(config, replica) == 1


def test_turn_weights_hold_back_only_organizations_that_ask_on_other_gateways_too() -> None:
    from flexserve.scheduler.scheduler import turn_weights

    replica = Replica(ScriptedEngine(capacity=8), 8)
    # One gateway (nobody asks elsewhere): equal turns, whatever the parts.
    replica.org_shares, replica.orgs_spread = {"small": 0.5, "big": 7.5}, set()
    assert turn_weights([replica]) == {}
    # "spread" also asks on another gateway: its turns here shrink to its
    # part here over the local organizations' mean part.
    replica.org_shares, replica.orgs_spread = {"spread": 2.0, "here": 4.0}, {"spread"}
    assert turn_weights([replica]) == {"spread": 0.5}
    # Where it is alone, nothing to weigh it against.
    replica.org_shares = {"spread": 2.0}
    assert turn_weights([replica]) == {"spread": 1.0}


async def test_default_counts_the_prompts_other_gateways_have_awaiting_prefill() -> None:
    """`first` has 500 prompt tokens of this gateway's awaiting prefill,
    `second` none of its own but 1,500 of other gateways' (as they said
    through Redis): a default goes to `first`, where less waits in all. Each
    change of what this gateway has awaiting prefill is told, for the others:
    the run put on a replica, its first output, its end."""
    async with first_and_second(capacity=8) as (scheduler, first, second):
        a, b = scheduler.replicas()
        told: list[str] = []
        scheduler.on_prefill_change = lambda replica: told.append(replica.name)
        a.add(Running(ServiceTier.FLEX, "o", 600, stream=False, prompt_tokens=500), time.monotonic())
        b.others_unprefilled = 1_500
        await run(scheduler, "d1", ServiceTier.DEFAULT)
        assert (first.started, second.started) == (["d1"], [])
        assert told == ["first", "first", "first"]


def test_packed_default_fills_the_first_replicas_flex_rooms_and_leaves_flex_the_rest() -> None:
    """``default_placement="pack"``, while there is flex: default and
    priority go to as few replicas as hold the fleet's default runs within
    their flex rooms (25 of 32 slots here), the first in the order of their
    names, every gateway's runs counted; among those, where the least prefill
    awaits, and spread evenly where none awaits. The
    count of such replicas rises at once and falls only with a headroom (7
    slots) to spare."""
    config = SchedulerConfig(default_placement="pack")
    replicas = [Replica(UpstreamEngine(f"http://10.0.0.{i}:8000"), 32) for i in (3, 1, 4, 2)]
    pool = ModelPool("m", replicas)
    by_name = {replica.name: replica for replica in replicas}
    first, second = by_name["upstream:http://10.0.0.1:8000"], by_name["upstream:http://10.0.0.2:8000"]
    now = time.monotonic()

    def pick() -> Replica | None:
        return pick_replica(config, pool, ServiceTier.DEFAULT, now)

    # No flex yet: spread (no default runs anywhere: the first listed).
    assert pick() is replicas[0]
    by_name["upstream:http://10.0.0.4:8000"].add(Running(ServiceTier.FLEX, "o", 600, stream=False), now)
    assert pick() is first
    first.others_default_runs = 24  # with this one, 25: the first's flex room holds them
    assert pick() is first
    first.others_default_runs = 25
    assert pick() is second
    assert pool.num_default_replicas == 2
    second.others_default_runs = 4
    # 25 + 4 + 1 = 30 runs would fit in one room of 25 only below 25 - 7 = 18.
    assert (pick(), pool.num_default_replicas) == (second, 2)
    first.others_default_runs, second.others_default_runs = 10, 8
    assert (pick(), pool.num_default_replicas) == (second, 2)
    # Among the packed, where the least prefill awaits, however many more
    # defaults run there (spread would keep to one more than the fewest).
    second.others_unprefilled = 600
    assert pick() is first
    second.others_unprefilled = 0
    first.others_default_runs = 9
    assert (pick(), pool.num_default_replicas) == (first, 1)
    # A packed replica with no slot left in this gateway's lease: the next in
    # the same order takes it, where the other gateways' go too.
    first.capacity = 0
    first.lease_pending = True  # held while its lease is renewed: wait for the answer
    assert pick() is None
    first.lease_pending = False
    assert pick() is second
    # Every packed replica (the first) with more than 2,048 prompt tokens
    # awaiting prefill: the next takes it if half as many or fewer await there.
    first.capacity = 32
    first.others_unprefilled, second.others_unprefilled = 3_000, 1_600
    assert pick() is first
    second.others_unprefilled = 1_500
    assert pick() is second
    first.others_unprefilled = 2_000
    assert pick() is first
    # Spread: by this gateway's own default runs (none), what the others
    # run not counted; ties to the first listed.
    config = SchedulerConfig(default_placement="spread")
    first.others_unprefilled = second.others_unprefilled = 0
    assert pick() is replicas[0]


def test_default_placement_is_pack_unless_set_to_spread() -> None:
    assert load_settings(environ={}).default_placement == SchedulerConfig().default_placement == "pack"
    assert load_settings(overrides={"default_placement": "spread"}, environ={}).default_placement == "spread"
    with pytest.raises(ConfigError, match="default_placement.*'packed' is not spread or pack"):
        load_settings(overrides={"default_placement": "packed"}, environ={})


def test_packed_flex_leaves_half_its_room_to_default_where_default_is_packed_or_runs() -> None:
    """Flex starts on a replica default is packed onto, or where default
    runs, only while the engine runs fewer flex sequences than half the
    flex room (12 of 25 here): so that when default ebbs, the flex refilling
    the room is not prefilled beside the defaults still decoding there. On
    a replica with no default, flex takes the whole room."""
    config = SchedulerConfig(default_placement="pack")
    now = time.monotonic()
    packed, hosting, alone = (Replica(UpstreamEngine(f"http://10.0.0.{i}:8000"), 32) for i in (1, 2, 3))
    packed.default_packed, packed.default_packed_at = True, now
    hosting.others_default_runs = 1
    for replica in (packed, hosting, alone):
        replica.packs_default = True  # in a pool of several
        # The engine runs 11 flex sequences of other gateways' (and the one default).
        replica.load = EngineLoad(11 + replica.others_default_runs, 0, 0.1, updated_at=now)
        assert can_admit(config, replica, ServiceTier.FLEX, now)
        replica.add(Running(ServiceTier.FLEX, "o", 600, stream=False), now)
    assert [can_admit(config, r, ServiceTier.FLEX, now) for r in (packed, hosting, alone)] == [False, False, True]
    # No default placed for PACK_RESERVE_HOLD seconds: where none runs, flex
    # takes the whole room again (the readings kept fresh).
    later = now + PACK_RESERVE_HOLD
    for replica in (packed, hosting, alone):
        replica.load = replace(replica.load, updated_at=later)
    assert [can_admit(config, r, ServiceTier.FLEX, later) for r in (packed, hosting, alone)] == [True, False, True]
    # A default placed anew marks the first replica packed again, as of then.
    pool = ModelPool("m", [packed, hosting, alone])
    pool.replicas[0].add(Running(ServiceTier.FLEX, "o", 600, stream=False), later)
    assert pick_replica(config, pool, ServiceTier.DEFAULT, later) is not None
    assert (packed.default_packed, packed.default_packed_at) == (True, later)
    # Spread: no such reserve; nor pack in a pool of one replica.
    assert can_admit(SchedulerConfig(default_placement="spread"), packed, ServiceTier.FLEX, now)
    hosting.packs_default = False
    assert can_admit(config, hosting, ServiceTier.FLEX, now)
