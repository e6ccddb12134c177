"""The scheduler without a network: synthetic requests in, order and
admission decisions out. The engine is a small scripted Engine implementation
(registered like a real one), not a mock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flexserve.engines.base import (
    Delta,
    Engine,
    EngineLoad,
    EngineRequest,
    ModelCard,
    SequenceControl,
    StepTimeModel,
    Usage,
)
from flexserve.errors import ResourceUnavailableError
from flexserve.observability.logs import REQUESTS_LOGGER
from flexserve.scheduler.drain import build_timeline
from flexserve.scheduler.fairness import FairQueue
from flexserve.scheduler.policy import SchedulerConfig, can_admit, headroom_slots
from flexserve.scheduler.prefill import PrefillBudget
from flexserve.scheduler.replicas import Replica, Running
from flexserve.scheduler.scheduler import Scheduler, Ticket
from flexserve.tiers import ServiceTier

MODEL = "scripted"


class ScriptedEngine(Engine):
    """Generates ``max_tokens`` tokens, one every ``token_time`` seconds, and
    records the order in which requests started."""

    name = "scripted"

    def __init__(self, capacity: int, token_time: float = 0.001, pausable: bool = False,
                 max_decoding: int | None = None, step_model: StepTimeModel | None = None) -> None:
        self._capacity = capacity
        self.token_time = token_time
        self.supports_pause = pausable
        self._max_decoding = max_decoding or capacity
        self._step_model = step_model
        self.started: list[str] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.load = EngineLoad()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_decoding(self) -> int:
        return self._max_decoding

    def step_time_model(self) -> StepTimeModel | None:
        return self._step_model

    def models(self) -> list[ModelCard]:
        return [ModelCard(MODEL)]

    async def read_load(self) -> EngineLoad:
        return EngineLoad(self.load.num_running, self.load.num_waiting, self.load.kv_cache_usage)

    async def generate(self, request: EngineRequest, control: SequenceControl | None = None) -> AsyncIterator[Delta]:
        self.started.append(request.request_id)
        n = request.max_tokens or 1
        try:
            for _ in range(n):
                if control is not None:
                    await control.wait_runnable()
                await asyncio.sleep(self.token_time)
                yield Delta("x ")
        except GeneratorExit:
            self.aborted.append(request.request_id)
            raise
        except asyncio.CancelledError:
            self.aborted.append(request.request_id)
            raise
        self.finished.append(request.request_id)
        yield Delta("", finish_reason="length", usage=Usage(3, n))


def decisions(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    """The request ids of the request log's ``event`` lines, in order."""
    return [getattr(record, "request_id", "") for record in caplog.records
            if getattr(record, "fields", {}).get("event") == event]


async def make_scheduler(engine: ScriptedEngine, **config: Any) -> Scheduler:
    config.setdefault("scrape_interval", 0.01)
    scheduler = Scheduler.from_engines([engine], SchedulerConfig(**config))
    await scheduler.start()
    await asyncio.sleep(0.03)  # first load read
    return scheduler


async def run(scheduler: Scheduler, request_id: str, tier: ServiceTier, tokens: int = 2,
              org: str = "org-a", stream: bool = False, max_wait: float | None = None,
              cost: int = 100, fingerprint: bytes | None = None) -> tuple[Ticket, str]:
    ticket = Ticket(request_id, MODEL, tier, org, cost_tokens=cost, stream=stream, max_wait=max_wait,
                    fingerprint=fingerprint)
    text = ""
    async for delta in scheduler.stream(ticket, EngineRequest.chat(request_id, MODEL, [], max_tokens=tokens)):
        text += delta.text
    return ticket, text


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


async def test_tiers_released_in_rank_order_then_arrival() -> None:
    engine = ScriptedEngine(capacity=1)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    blocker = asyncio.create_task(run(scheduler, "blocker", ServiceTier.DEFAULT, tokens=30))
    await until(lambda: engine.started == ["blocker"])
    tasks = [
        asyncio.create_task(run(scheduler, rid, tier))
        for rid, tier in [("f1", ServiceTier.FLEX), ("d1", ServiceTier.DEFAULT), ("p1", ServiceTier.PRIORITY),
                          ("f2", ServiceTier.FLEX), ("d2", ServiceTier.DEFAULT)]
    ]
    await asyncio.gather(blocker, *tasks)
    assert engine.started == ["blocker", "p1", "d1", "d2", "f1", "f2"]
    await scheduler.close()


async def test_tier_blind_gateway_is_fcfs() -> None:
    engine = ScriptedEngine(capacity=1)
    scheduler = await make_scheduler(engine, tiers_enabled=False)
    blocker = asyncio.create_task(run(scheduler, "blocker", ServiceTier.DEFAULT, tokens=30))
    await until(lambda: engine.started == ["blocker"])
    tasks = []
    for rid, tier in [("f1", ServiceTier.FLEX), ("d1", ServiceTier.DEFAULT), ("p1", ServiceTier.PRIORITY)]:
        tasks.append(asyncio.create_task(run(scheduler, rid, tier)))
        await asyncio.sleep(0.001)
    await asyncio.gather(blocker, *tasks)
    assert engine.started == ["blocker", "f1", "d1", "p1"]
    await scheduler.close()


def test_fair_queue_shares_tokens_across_organizations() -> None:
    class W:
        def __init__(self, org: str, n: int, cost: int) -> None:
            self.org_id, self.cost_tokens, self.arrival, self.queued = org, cost, float(n), True
            self.name = f"{org}{n}"

    queue = FairQueue(quantum=1000)
    for n in range(1000):  # a big evaluation arrives first
        queue.push(W("big", n, 500))  # type: ignore[arg-type]
    for n in range(10):
        queue.push(W("small", n, 500))  # type: ignore[arg-type]
    order = [queue.pop().name for _ in range(40)]  # type: ignore[union-attr]
    small_positions = [i for i, name in enumerate(order) if name.startswith("small")]
    assert len(small_positions) == 10
    assert small_positions[-1] < 25  # served alongside, not after 1,000 big ones
    # Equal token shares while both have work: two of each per turn.
    assert order[:8] == ["big0", "big1", "small0", "small1", "big2", "big3", "small2", "small3"]


def test_fair_queue_charges_tokens_not_requests() -> None:
    class W:
        def __init__(self, org: str, cost: int) -> None:
            self.org_id, self.cost_tokens, self.arrival, self.queued = org, cost, 0.0, True

    queue = FairQueue(quantum=1000)
    for _ in range(20):
        queue.push(W("heavy", 1000))  # type: ignore[arg-type]
        queue.push(W("light", 100))  # type: ignore[arg-type]
    served = [queue.pop().org_id for _ in range(22)]  # type: ignore[union-attr]
    assert served.count("light") == 20  # ten light requests cost what one heavy one does
    assert served.count("heavy") == 2


def test_fair_queue_weights_give_an_organization_more_of_each_turn() -> None:
    """Where gateways share engines, an organization's weight is its part of
    this gateway's lease (``flexserve.shared.capacity``): twice the weight,
    twice the tokens per turn."""
    class W:
        def __init__(self, org: str) -> None:
            self.org_id, self.cost_tokens, self.arrival, self.queued = org, 500, 0.0, True

    queue = FairQueue(quantum=1000)
    queue.weights = {"spread": 0.5, "here": 1.0}
    for _ in range(30):
        queue.push(W("spread"))  # type: ignore[arg-type]
        queue.push(W("here"))  # type: ignore[arg-type]
    served = [queue.pop().org_id for _ in range(30)]  # type: ignore[union-attr]
    assert served.count("here") == 20 and served.count("spread") == 10


def test_fair_queue_keeps_the_order_waiters_joined_in() -> None:
    class W:
        def __init__(self, org: str, n: int) -> None:
            self.org_id, self.cost_tokens, self.arrival, self.queued = org, 100, float(n), True

    queue = FairQueue()
    waiters = [W(f"org-{n % 3}", n) for n in range(300)]
    for waiter in waiters:
        queue.push(waiter)  # type: ignore[arg-type]
    requeued = W("org-1", -1)
    queue.push(requeued, front=True)  # type: ignore[arg-type]
    # Leave from the middle, well past half of them (the order is compacted), and both ends.
    for waiter in waiters[::3] + waiters[1:280:3] + waiters[-1:]:
        queue.remove(waiter)  # type: ignore[arg-type]
    served = queue.pop()
    assert served is requeued  # preempted work first, as its place in line says
    expected = [w for w in waiters if w.queued]
    assert len(expected) == len(queue) == 106
    assert list(queue.newest_first()) == expected[::-1]


async def test_flex_leaves_headroom_for_default() -> None:
    engine = ScriptedEngine(capacity=5)
    scheduler = await make_scheduler(engine, flex_headroom=0.2)
    assert headroom_slots(scheduler.config, 5) == 1
    flex = [asyncio.create_task(run(scheduler, f"f{i}", ServiceTier.FLEX, tokens=200)) for i in range(6)]
    await until(lambda: len(engine.started) == 4)
    await asyncio.sleep(0.05)
    assert len(engine.started) == 4  # the fifth slot is kept
    assert scheduler.pools[MODEL].queue.num_waiting(ServiceTier.FLEX) == 2
    ticket, _ = await run(scheduler, "d1", ServiceTier.DEFAULT, tokens=2)
    assert ticket.queue_time < 0.05 and ticket.num_preemptions == 0
    for task in flex:
        task.cancel()
    await asyncio.gather(*flex, return_exceptions=True)
    await scheduler.close()


def _replica(capacity: int = 4, **load: Any) -> Replica:
    replica = Replica(ScriptedEngine(capacity), capacity)
    replica.load = EngineLoad(**load)
    return replica


@pytest.mark.parametrize(
    ("load", "flex_ok"),
    [
        ({}, True),
        ({"num_waiting": 1}, False),  # the engine queues: no spare capacity
        ({"kv_cache_usage": 0.85}, False),  # KV nearly full
        ({"kv_cache_usage": 0.5}, True),
        ({"updated_at": time.monotonic() - 5}, False),  # stale signal counts as saturated
    ],
)
def test_flex_admission_follows_load_signals(load: dict[str, Any], flex_ok: bool) -> None:
    config = SchedulerConfig(load_stale_after=0.5)
    replica = _replica(**load)
    now = time.monotonic()
    assert can_admit(config, replica, ServiceTier.FLEX, now) is flex_ok
    assert can_admit(config, replica, ServiceTier.DEFAULT, now) is True


def test_engine_without_signals_uses_in_flight_counts() -> None:
    replica = _replica(updated_at=float("-inf"))
    replica.has_signals = False
    assert can_admit(SchedulerConfig(), replica, ServiceTier.FLEX, time.monotonic())


def test_tpot_slo_caps_flex_in_flight() -> None:
    model = StepTimeModel(t0=0.010, a=0.0, c=1e-5)  # 10 ms + 10 µs per KV token held
    engine = ScriptedEngine(64, step_model=model)
    replica = Replica(engine, 64, load=EngineLoad())
    config = SchedulerConfig(tpot_slo=0.020, flex_headroom=0.0)
    now = time.monotonic()
    admitted = 0
    while can_admit(config, replica, ServiceTier.FLEX, now):
        replica.add(Running(ServiceTier.FLEX, "o", 100, stream=False), now)
        admitted += 1
    # 10 ms + n * 100 tokens * 10 µs <= 20 ms  =>  n <= 10
    assert admitted == 10
    assert can_admit(config, replica, ServiceTier.DEFAULT, now)


def test_prefill_budget_banks_a_share_of_time_and_goes_into_debt() -> None:
    budget = PrefillBudget()
    assert budget.credit(0.0, 0.5) == pytest.approx(0.05)  # starts with one prompt's worth
    budget.charge(0.0, 0.15)
    assert budget.credit(0.0, 0.5) == pytest.approx(-0.10)
    assert budget.credit(0.1, 0.5) == pytest.approx(-0.05)  # earns half of each second
    assert budget.credit(10.0, 0.5) == pytest.approx(0.05)  # and banks no more than the cap
    assert budget.recent_share(5.0) == pytest.approx(0.15 / 10)
    assert budget.recent_share(10.5) == 0.0  # the charge left the window


def _paced_flex_seconds(config: SchedulerConfig, model: StepTimeModel, default_prompt: int) -> tuple[float, float]:
    """Ten simulated seconds, every 10 ms: a default request with ``default_prompt``
    tokens every 100 ms, and flex (1,000-token prompts) whenever admitted; runs end
    at once so the decode step stays the same; at most five flex per look.
    Prefill seconds charged to (flex, default)."""
    replica = Replica(ScriptedEngine(64, step_model=model), 64, load=EngineLoad())
    flex_seconds = default_seconds = 0.0
    for tick in range(1000):
        now = 1000.0 + tick * 0.01
        replica.load = EngineLoad(updated_at=now)
        if tick % 10 == 0 and default_prompt:
            run = Running(ServiceTier.DEFAULT, "o", 0, stream=False, prompt_tokens=default_prompt)
            replica.add(run, now)
            replica.discard(run)
            default_seconds += replica.prefill_seconds(default_prompt)
        for _ in range(5):  # at most five flex per look
            if not can_admit(config, replica, ServiceTier.FLEX, now):
                break
            run = Running(ServiceTier.FLEX, "o", 0, stream=False, prompt_tokens=1000)
            replica.add(run, now)
            replica.discard(run)
            flex_seconds += replica.prefill_seconds(1000)
    return flex_seconds, default_seconds


def test_flex_prefill_paced_to_the_share_the_tpot_slo_leaves() -> None:
    # Decode step 10 ms, prefill 10k tokens/s; SLO 12.5 ms leaves prefill 1 - 10/12.5 = 20 %.
    model = StepTimeModel(t0=0.010, a=1e-4, c=0.0)
    config = SchedulerConfig(tpot_slo=0.0125, flex_headroom=0.0)
    flex_seconds, _ = _paced_flex_seconds(config, model, default_prompt=0)
    # 20 % of 10 s = 2 s of prefill (20 prompts of 0.1 s), give or take the bank and one prompt.
    assert 1.9 <= flex_seconds <= 2.2
    # Default's own prompts (100 ms of every second: 1,000 tokens every 100 ms) come first.
    flex_seconds, default_seconds = _paced_flex_seconds(config, model, default_prompt=100)
    assert default_seconds == pytest.approx(1.0)
    assert 0.9 <= flex_seconds <= 1.2
    # No SLO, no pacing: five flex on every look.
    unpaced, _ = _paced_flex_seconds(SchedulerConfig(flex_headroom=0.0), model, default_prompt=0)
    assert unpaced == pytest.approx(5 * 1000 * 0.1)


def test_prompt_estimate_corrected_by_what_the_engine_counts() -> None:
    replica = Replica(ScriptedEngine(4, step_model=StepTimeModel(0.01, 1e-4, 0.0)), 4)
    for _ in range(100):
        replica.observe_prompt(engine_tokens=50, estimated=100)
    assert replica.prompt_scale == pytest.approx(0.5, rel=1e-3)
    assert replica.prefill_seconds(1000) == pytest.approx(0.05, rel=1e-3)


async def test_flex_refused_with_retry_after_at_its_deadline() -> None:
    # Default in a slot flex usually has: the estimate (flex runs of 0.1 s) lets it wait.
    engine = ScriptedEngine(capacity=1, step_model=StepTimeModel(0.001, 0.0, 0.0))
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    blocker = asyncio.create_task(run(scheduler, "blocker", ServiceTier.DEFAULT, tokens=500))
    await until(lambda: engine.started == ["blocker"])
    started = time.monotonic()
    with pytest.raises(ResourceUnavailableError) as caught:
        await run(scheduler, "f1", ServiceTier.FLEX, max_wait=0.2)
    waited = time.monotonic() - started
    assert 0.15 < waited < 2.0
    assert int(caught.value.headers["Retry-After"]) >= 1
    assert caught.value.code == "resource_unavailable"
    assert "f1" not in engine.started  # never ran
    assert scheduler.pools[MODEL].queue.num_waiting() == 0
    blocker.cancel()
    await asyncio.gather(blocker, return_exceptions=True)
    await scheduler.close()


async def test_flex_refused_at_once_only_when_even_the_optimistic_estimate_exceeds_its_deadline() -> None:
    engine = ScriptedEngine(capacity=1, token_time=0.002)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    # A backlog of flex whose runs have been seen to end: the drain is known.
    backlog = [asyncio.create_task(run(scheduler, f"b{i}", ServiceTier.FLEX, tokens=10)) for i in range(40)]
    await until(lambda: len(engine.finished) >= 5)
    pool = scheduler.pools[MODEL]
    estimate = scheduler.estimate_flex_wait(pool, "org-b", 100)
    assert estimate is not None and 0 < estimate.p10 < estimate.p50 < estimate.p90
    started = time.monotonic()
    with pytest.raises(ResourceUnavailableError) as caught:
        await run(scheduler, "late", ServiceTier.FLEX, org="org-b", max_wait=estimate.p10 / 3)
    # Refused on arrival by its estimate, not by its deadline's timer after waiting.
    assert time.monotonic() - started < estimate.p10 / 3
    assert "the estimated wait" in caught.value.message
    assert int(caught.value.headers["Retry-After"]) >= 1
    # A deadline the optimistic end of the estimate fits is queued, not refused.
    accepted = asyncio.create_task(
        run(scheduler, "fits", ServiceTier.FLEX, org="org-b", max_wait=estimate.p50)
    )
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) > 0 and not accepted.done())
    assert not accepted.done()
    for task in [*backlog, accepted]:
        task.cancel()
    await asyncio.gather(*backlog, accepted, return_exceptions=True)
    await scheduler.close()


async def test_waiter_whose_client_leaves_is_dropped() -> None:
    engine = ScriptedEngine(capacity=1)
    scheduler = await make_scheduler(engine)
    blocker = asyncio.create_task(run(scheduler, "blocker", ServiceTier.DEFAULT, tokens=100))
    await until(lambda: engine.started == ["blocker"])
    waiting = [asyncio.create_task(run(scheduler, f"d{i}", ServiceTier.DEFAULT)) for i in range(50)]
    await until(lambda: scheduler.pools[MODEL].queue.num_waiting() == 50)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert scheduler.pools[MODEL].queue.num_waiting() == 0
    await blocker
    assert engine.started == ["blocker"]  # none of the departed ever ran
    await scheduler.close()


async def test_default_preempts_newest_restartable_flex(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUESTS_LOGGER)
    engine = ScriptedEngine(capacity=2, token_time=0.002)
    scheduler = await make_scheduler(engine, flex_headroom=0.0, preempt_cooldown=0.2)
    old = asyncio.create_task(run(scheduler, "old", ServiceTier.FLEX, tokens=100))
    await until(lambda: engine.started == ["old"])
    new = asyncio.create_task(run(scheduler, "new", ServiceTier.FLEX, tokens=30))
    await until(lambda: engine.started == ["old", "new"])
    ticket, _ = await run(scheduler, "d1", ServiceTier.DEFAULT, tokens=5)
    assert ticket.served_tier is ServiceTier.DEFAULT
    assert engine.aborted == ["new"]  # the newest flex yielded, the older kept going
    assert decisions(caplog, "preempted") == ["new"]  # in the request log, under its id
    new_ticket, text = await new
    assert new_ticket.num_preemptions == 1
    assert text.count("x") == 30  # restarted from scratch, output complete and not doubled
    assert engine.started.count("new") == 2
    await old
    assert scheduler.pools[MODEL].num_preemptions == 1
    await scheduler.close()


async def test_streamed_flex_with_output_is_not_aborted() -> None:
    engine = ScriptedEngine(capacity=1, token_time=0.002)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    flex = asyncio.create_task(run(scheduler, "f", ServiceTier.FLEX, tokens=40, stream=True))
    await until(lambda: engine.started == ["f"])
    await asyncio.sleep(0.02)  # tokens have reached the client
    ticket, _ = await run(scheduler, "d", ServiceTier.DEFAULT, tokens=2)
    assert engine.aborted == []
    assert ticket.queue_time > 0.01  # it waited for the stream to end instead
    await flex
    await scheduler.close()


async def test_preemption_cooldown_keeps_flex_out() -> None:
    engine = ScriptedEngine(capacity=1, token_time=0.002)
    scheduler = await make_scheduler(engine, flex_headroom=0.0, preempt_cooldown=0.3)
    flex = asyncio.create_task(run(scheduler, "f", ServiceTier.FLEX, tokens=200))
    await until(lambda: engine.started == ["f"])
    await run(scheduler, "d", ServiceTier.DEFAULT, tokens=2)
    preempted_at = scheduler.pools[MODEL].replicas[0].last_preempted_at
    await until(lambda: engine.started.count("f") == 2)
    # Hysteresis, no thrash: not back before the cooldown, however long default took.
    assert time.monotonic() - preempted_at >= 0.3
    flex.cancel()
    await asyncio.gather(flex, return_exceptions=True)
    await scheduler.close()


async def test_pausable_engine_pauses_flex_for_default() -> None:
    engine = ScriptedEngine(capacity=3, token_time=0.002, pausable=True, max_decoding=1)
    scheduler = await make_scheduler(engine, flex_headroom=0.34)
    flex = asyncio.create_task(run(scheduler, "f", ServiceTier.FLEX, tokens=60, stream=True))
    await until(lambda: engine.started == ["f"])
    await asyncio.sleep(0.01)
    await run(scheduler, "d", ServiceTier.DEFAULT, tokens=20)
    assert engine.aborted == []  # paused, not aborted
    assert scheduler.pools[MODEL].num_pauses == 1
    ticket, text = await flex
    assert text.count("x") == 60 and ticket.num_preemptions == 0
    await scheduler.close()


async def test_priority_over_its_share_is_served_as_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUESTS_LOGGER)
    engine = ScriptedEngine(capacity=4)
    scheduler = await make_scheduler(engine, priority_share=0.5)
    tasks = [asyncio.create_task(run(scheduler, f"p{i}", ServiceTier.PRIORITY, tokens=20)) for i in range(3)]
    results = await asyncio.gather(*tasks)
    served = sorted(t.served_tier.value for t, _ in results)  # type: ignore[union-attr]
    assert served == ["default", "priority", "priority"]
    assert scheduler.pools[MODEL].num_downgraded == 1
    [downgraded] = [t for t, _ in results if t.served_tier is ServiceTier.DEFAULT]
    assert decisions(caplog, "priority_downgraded") == [downgraded.request_id]
    await scheduler.close()


async def test_flex_status_reports_queue_and_spare_capacity() -> None:
    engine = ScriptedEngine(capacity=5)
    scheduler = await make_scheduler(engine, flex_headroom=0.2)
    (idle,) = scheduler.flex_status()
    assert idle["spare_capacity"] == pytest.approx(0.8) and idle["queue_depth"] == 0 and idle["accepting"]
    flex = [asyncio.create_task(run(scheduler, f"f{i}", ServiceTier.FLEX, tokens=300)) for i in range(7)]
    await until(lambda: scheduler.pools[MODEL].queue.num_waiting(ServiceTier.FLEX) == 3)
    (busy,) = scheduler.flex_status()
    assert busy["spare_capacity"] == 0.0 and busy["queue_depth"] == 3
    for task in flex:
        task.cancel()
    await asyncio.gather(*flex, return_exceptions=True)
    await scheduler.close()


async def test_shedding_walks_from_the_newest_flex_and_stops_at_one_that_can_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=REQUESTS_LOGGER)
    engine = ScriptedEngine(capacity=1, token_time=10.0, step_model=StepTimeModel(0.05, 0.0, 0.0))
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    pool = scheduler.pools[MODEL]
    blocker = asyncio.create_task(run(scheduler, "blocker", ServiceTier.FLEX, tokens=3))
    await until(lambda: engine.started == ["blocker"])
    tasks = {
        f"f{i}": asyncio.create_task(run(scheduler, f"f{i}", ServiceTier.FLEX, org=f"org-{i % 2}", max_wait=600))
        for i in range(12)
    }
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 12)
    for rid in ("f8", "f10"):  # their clients leave: out of the line
        tasks[rid].cancel()
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 10)
    # Deadlines that places 0-6 of the drain can make and places 7 and later
    # cannot, even at the optimistic end; f2's is hopeless too, but it stands
    # ahead of waiters that can wait (its timer refuses it).
    now = time.monotonic()
    timeline = build_timeline(pool, scheduler.config, now)
    fits, misses = timeline.wait(6), timeline.wait(7)
    assert fits is not None and misses is not None and fits.p10 < misses.p10
    for waiter in pool.queue.flex_newest_first():
        waiter.deadline = now + (fits.p10 + misses.p10) / 2
    waiters = list(pool.queue.flex_newest_first())
    waiters[7].deadline = now + 0.001  # f2: in line f0 f1 f2 f3 f4 f5 f6 f7 f9 f11
    scheduler.waits.shed_hopeless(pool)
    await asyncio.sleep(0)
    refused = {
        rid for rid, task in tasks.items()
        if task.done() and not task.cancelled() and isinstance(task.exception(), ResourceUnavailableError)
    }
    assert refused == {"f7", "f9", "f11"}
    # Decided in the scheduler's own pass, and logged under each request's id.
    assert sorted(decisions(caplog, "flex_refused")) == ["f11", "f7", "f9"]
    assert pool.queue.num_waiting(ServiceTier.FLEX) == 7 and pool.num_flex_refused == 3
    for task in [*tasks.values(), blocker]:
        task.cancel()
    await asyncio.gather(*tasks.values(), blocker, return_exceptions=True)
    await scheduler.close()


async def test_a_preemptible_run_takes_no_task_of_its_own() -> None:
    engine = ScriptedEngine(capacity=1, token_time=0.01)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    before = asyncio.all_tasks()
    flex = asyncio.create_task(run(scheduler, "f", ServiceTier.FLEX, tokens=20))
    await until(lambda: engine.started == ["f"])
    assert asyncio.all_tasks() - before == {flex}
    await flex
    await scheduler.close()


async def test_flex_whose_client_leaves_as_it_is_preempted_is_not_requeued() -> None:
    engine = ScriptedEngine(capacity=1, token_time=10.0)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    flex = asyncio.create_task(run(scheduler, "f", ServiceTier.FLEX, tokens=3))
    await until(lambda: engine.started == ["f"])  # now asleep for its first token
    engine.token_time = 0.001
    default = asyncio.create_task(run(scheduler, "d", ServiceTier.DEFAULT, tokens=2))
    flex.cancel()  # in the same turn of the loop as default preempts it
    with pytest.raises(asyncio.CancelledError):
        await flex
    ticket, _ = await default
    pool = scheduler.pools[MODEL]
    assert engine.started == ["f", "d"] and engine.aborted == ["f"]  # never run again
    assert ticket.queue_time < 1.0 and pool.num_preemptions == 1 and pool.num_preempting == 0
    assert pool.queue.num_waiting() == 0 and pool.num_in_flight == 0
    await scheduler.close()


async def test_of_replicas_with_as_many_free_slots_the_least_loaded_engine_gets_the_request() -> None:
    """Gateways sharing engines each see only their own runs: by free slots
    alone two replicas tie, and every gateway chose the first listed. The
    engines' own load readings (other gateways' work included) break it."""
    busy, idle = ScriptedEngine(capacity=8), ScriptedEngine(capacity=8)
    busy.name, idle.name = "busy", "idle"
    busy.load, idle.load = EngineLoad(num_running=6), EngineLoad(num_running=1)
    scheduler = Scheduler.from_engines([busy, idle], SchedulerConfig(scrape_interval=0.01))
    await scheduler.start()
    try:
        await until(lambda: all(r.load.num_running for r in scheduler.replicas()))
        await run(scheduler, "d1", ServiceTier.DEFAULT)
        assert (busy.started, idle.started) == ([], ["d1"])
        busy.load, idle.load = EngineLoad(num_running=0, num_waiting=1), EngineLoad(num_running=3)
        await until(lambda: scheduler.replicas()[0].load.num_waiting == 1)
        await run(scheduler, "d2", ServiceTier.DEFAULT)
        assert busy.started == ["d2"]
    finally:
        await scheduler.close()


async def test_default_goes_where_the_fewest_prompt_tokens_wait_for_prefill_within_one_default_of_the_fewest() -> None:
    """A prompt queues behind the prompts its engine is still prefilling.
    `first` has a flex run whose 2,000-token prompt has had no output yet,
    `second` one whose prompt is done: a default goes to `second`. Then
    `second` runs two defaults more than `first`: past the spread of one, it
    is not chosen however much `first` has to prefill."""
    async with first_and_second(capacity=8) as (scheduler, first, second):
        a, b = scheduler.replicas()
        now = time.monotonic()
        a.add(Running(ServiceTier.FLEX, "o", 2100, stream=False, prompt_tokens=2000), now)
        prefilled = Running(ServiceTier.FLEX, "o", 2100, stream=False, prompt_tokens=2000)
        prefilled.num_output = 5
        b.add(prefilled, now)
        await run(scheduler, "d1", ServiceTier.DEFAULT)
        assert (first.started, second.started) == ([], ["d1"])
        for _ in range(2):
            done = Running(ServiceTier.DEFAULT, "o", 100, stream=False, prompt_tokens=50)
            done.num_output = 1
            b.add(done, now)
        await run(scheduler, "d2", ServiceTier.DEFAULT)
        assert (first.started, second.started) == (["d2"], ["d1"])


async def test_default_goes_where_the_fewest_defaults_run_flex_where_most_slots_are_free() -> None:
    """`first` runs three flex (one slot free), `second` one default (three
    free). By free slots a default would join `second`; it goes to `first`,
    where no default runs (a replica that draws the defaults keeps its flex
    from starting again, and so goes on drawing them). Flex goes by free
    slots, to `second`."""
    async with first_and_second(capacity=4) as (scheduler, first, second):
        a, b = scheduler.replicas()
        now = time.monotonic()
        for _ in range(3):
            a.add(Running(ServiceTier.FLEX, "o", 100, stream=False), now)
        b.add(Running(ServiceTier.DEFAULT, "o", 100, stream=False), now)
        await run(scheduler, "d1", ServiceTier.DEFAULT)
        assert (first.started, second.started) == (["d1"], [])
        await run(scheduler, "f1", ServiceTier.FLEX)
        assert (first.started, second.started) == (["d1"], ["f1"])


@contextlib.asynccontextmanager
async def first_and_second(capacity: int) -> AsyncIterator[tuple[Scheduler, ScriptedEngine, ScriptedEngine]]:
    """A started scheduler over two scripted engines named `first` and
    `second`, with no flex headroom and default spread over both (packed
    placement: test_scheduler_shared.py); closed on leaving."""
    first, second = ScriptedEngine(capacity=capacity), ScriptedEngine(capacity=capacity)
    first.name, second.name = "first", "second"
    config = SchedulerConfig(scrape_interval=0.01, flex_headroom=0.0, default_placement="spread")
    scheduler = Scheduler.from_engines([first, second], config)
    await scheduler.start()
    try:
        await asyncio.sleep(0.03)
        yield scheduler, first, second
    finally:
        await scheduler.close()
