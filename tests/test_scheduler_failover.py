"""The scheduler with replicas that turn work away (429, 503, no answer):
failover, pauses, and what a refusal after output means. The engines are
scripted Engine implementations (test_scheduler.py), not mocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flexserve.engines.base import (
    Delta,
    Engine,
    EngineLoad,
    EngineRequest,
    NoLoadSignalsError,
    SequenceControl,
    Usage,
)
from flexserve.errors import EngineOverloadedError, ResourceUnavailableError
from flexserve.scheduler.policy import SchedulerConfig, can_admit
from flexserve.scheduler.scheduler import Scheduler, Ticket
from flexserve.tiers import ServiceTier
from test_scheduler import MODEL, ScriptedEngine, _replica, run, until

class RefusingEngine(ScriptedEngine):
    """Turns its first ``num_refusals`` requests away before any output, as an
    upstream answering 429 does (or, with ``after_output``, after one token),
    then generates as ScriptedEngine. It has no load signals, as a provider
    has none: nothing but the scheduler's own timers releases its waiters."""

    def __init__(self, name: str, num_refusals: int = 0, retry_after: float | None = None,
                 after_output: bool = False, capacity: int = 4) -> None:
        super().__init__(capacity)
        self.name = name
        self.num_refusals = num_refusals
        self.retry_after = retry_after
        self.after_output = after_output
        self.refused: list[str] = []

    async def read_load(self) -> EngineLoad:
        raise NoLoadSignalsError(f"{self.name} has no /metrics")

    async def generate(self, request: EngineRequest, control: SequenceControl | None = None) -> AsyncIterator[Delta]:
        if self.num_refusals > 0:
            self.num_refusals -= 1
            self.refused.append(request.request_id)
            if self.after_output:
                yield Delta("x ")
            raise EngineOverloadedError(f"{self.name} is overloaded (HTTP 429)", retry_after=self.retry_after)
        async for delta in super().generate(request, control):
            yield delta


async def start_scheduler(*engines: Engine, **config: Any) -> Scheduler:
    scheduler = Scheduler.from_engines(list(engines), SchedulerConfig(**config))
    await scheduler.start()
    await asyncio.sleep(0.01)  # the load watches find no signals
    return scheduler


def test_a_replica_backing_off_admits_no_tier() -> None:
    config = SchedulerConfig()
    replica = _replica()
    replica.has_signals = False  # so that flex is judged by the pause alone
    now = time.monotonic()
    replica.backoff_until = now + 1.0
    for tier in (ServiceTier.PRIORITY, ServiceTier.DEFAULT, ServiceTier.FLEX):
        assert not can_admit(config, replica, tier, now)
        assert can_admit(config, replica, tier, now + 1.0)


async def test_refused_default_fails_over_to_another_replica_unbilled() -> None:
    busy = RefusingEngine("busy", num_refusals=99, retry_after=5.0)
    steady = RefusingEngine("steady")
    scheduler = await start_scheduler(busy, steady)
    pool = scheduler.pools[MODEL]
    ticket = Ticket("d1", MODEL, ServiceTier.DEFAULT, "org-a", cost_tokens=100)
    request = EngineRequest.chat("d1", MODEL, [], max_tokens=3)
    deltas = [delta async for delta in scheduler.stream(ticket, request)]
    # Tried first (most free slots, first in line), it refused; the run that
    # counts is the other replica's, and it is all the caller saw.
    assert busy.refused == ["d1"] and busy.started == []
    assert steady.finished == ["d1"] and ticket.replica_name == "steady"
    assert "".join(d.text for d in deltas) == "x x x "
    assert [d.usage for d in deltas if d.usage] == [Usage(3, 3)]
    assert pool.num_failovers == 1 and pool.replicas[0].num_refusals == 1
    # Paused for as long as it asked: the next request goes straight elsewhere.
    assert pool.replicas[0].backed_off(time.monotonic())
    assert pool.replicas[0].backoff_until - time.monotonic() <= 5.0
    second, _ = await run(scheduler, "d2", ServiceTier.DEFAULT)
    assert busy.refused == ["d1"] and second.replica_name == "steady"
    assert pool.num_in_flight == 0
    await scheduler.close()


@pytest.mark.parametrize("tier", [ServiceTier.DEFAULT, ServiceTier.PRIORITY])
async def test_refused_by_the_only_replica_is_a_503_with_its_retry_after(tier: ServiceTier) -> None:
    engine = RefusingEngine("only", num_refusals=1, retry_after=7.0)
    scheduler = await start_scheduler(engine)
    with pytest.raises(EngineOverloadedError) as caught:
        await run(scheduler, "r1", tier)
    assert caught.value.status_code == 503 and caught.value.code == "engine_overloaded"
    assert caught.value.headers["Retry-After"] == "7"
    assert engine.refused == ["r1"] and engine.started == []
    pool = scheduler.pools[MODEL]
    assert pool.num_failovers == 0 and pool.num_in_flight == 0 and pool.queue.num_waiting() == 0
    await scheduler.close()


async def test_a_replica_that_says_nothing_is_paused_the_default_while() -> None:
    engine = RefusingEngine("only", num_refusals=1)  # a failed connection: no Retry-After
    scheduler = await start_scheduler(engine, replica_backoff=2.0)
    with pytest.raises(EngineOverloadedError) as caught:
        await run(scheduler, "d1", ServiceTier.DEFAULT)
    assert caught.value.headers["Retry-After"] == "2"
    replica = scheduler.pools[MODEL].replicas[0]
    assert 0 < replica.backoff_until - time.monotonic() <= 2.0
    await scheduler.close()


async def test_a_replicas_own_pause_is_capped() -> None:
    engine = RefusingEngine("only", num_refusals=1, retry_after=3600.0)
    scheduler = await start_scheduler(engine, replica_backoff_max=10.0)
    with pytest.raises(EngineOverloadedError) as caught:
        await run(scheduler, "d1", ServiceTier.DEFAULT)
    assert caught.value.headers["Retry-After"] == "3600"  # the client is told what the upstream said
    replica = scheduler.pools[MODEL].replicas[0]
    assert replica.backoff_until - time.monotonic() <= 10.0
    await scheduler.close()


async def test_default_tries_each_replica_once() -> None:
    first = RefusingEngine("first", num_refusals=99, retry_after=0.05)
    second = RefusingEngine("second", num_refusals=99, retry_after=0.05)
    scheduler = await start_scheduler(first, second)
    with pytest.raises(EngineOverloadedError):
        await run(scheduler, "d1", ServiceTier.DEFAULT)
    assert first.refused == ["d1"] and second.refused == ["d1"]
    assert scheduler.pools[MODEL].num_failovers == 1
    await scheduler.close()


async def test_waiters_wait_out_a_pause_and_are_released_when_it_ends() -> None:
    engine = RefusingEngine("only", num_refusals=1)
    scheduler = await start_scheduler(engine, replica_backoff=0.2)
    with pytest.raises(EngineOverloadedError):
        await run(scheduler, "d1", ServiceTier.DEFAULT)
    replica = scheduler.pools[MODEL].replicas[0]
    paused_until = replica.backoff_until
    waiting = asyncio.create_task(run(scheduler, "d2", ServiceTier.DEFAULT))
    await until(lambda: scheduler.pools[MODEL].queue.num_waiting(ServiceTier.DEFAULT) == 1)
    assert engine.started == []  # not offered to the pausing replica
    # No load watch runs for this replica: the pause's own timer releases it.
    ticket, text = await asyncio.wait_for(waiting, 10)
    assert text == "x x " and engine.started == ["d2"] and engine.refused == ["d1"]
    assert ticket.admitted_at is not None and ticket.admitted_at >= paused_until
    await scheduler.close()


async def test_refused_flex_waits_for_the_replica_and_is_served() -> None:
    engine = RefusingEngine("only", num_refusals=1, retry_after=None)
    scheduler = await start_scheduler(engine, replica_backoff=0.1)
    ticket, text = await asyncio.wait_for(run(scheduler, "f1", ServiceTier.FLEX), 10)
    assert engine.refused == ["f1"] and engine.finished == ["f1"]
    assert text == "x x " and ticket.served_tier is ServiceTier.FLEX
    assert scheduler.pools[MODEL].num_failovers == 1
    await scheduler.close()


async def test_flex_refused_until_its_deadline_gets_429_and_never_runs() -> None:
    engine = RefusingEngine("only", num_refusals=99, retry_after=30.0)
    scheduler = await start_scheduler(engine)
    with pytest.raises(ResourceUnavailableError) as caught:
        await run(scheduler, "f1", ServiceTier.FLEX, max_wait=0.1)
    assert caught.value.code == "resource_unavailable" and int(caught.value.headers["Retry-After"]) >= 1
    assert engine.refused == ["f1"] and engine.started == []  # tried once, then waited
    pool = scheduler.pools[MODEL]
    assert pool.num_flex_refused == 1 and pool.num_failovers == 1
    assert pool.num_in_flight == 0 and pool.queue.num_waiting() == 0
    await scheduler.close()


async def test_a_refusal_after_output_is_the_runs_own_failure() -> None:
    late = RefusingEngine("late", num_refusals=1, after_output=True)
    steady = RefusingEngine("steady")
    scheduler = await start_scheduler(late, steady)
    ticket = Ticket("d1", MODEL, ServiceTier.DEFAULT, "org-a", cost_tokens=100, stream=True)
    seen: list[str] = []
    with pytest.raises(EngineOverloadedError):
        async for delta in scheduler.stream(ticket, EngineRequest.chat("d1", MODEL, [], max_tokens=2)):
            seen.append(delta.text)
    assert seen == ["x "] and steady.started == []  # not run again: its output was out
    assert scheduler.pools[MODEL].num_failovers == 0
    await scheduler.close()
