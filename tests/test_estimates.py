"""Flex wait estimates: the drain timeline, its learning, Retry-After, and
what clients and operators see of them.

The estimator is driven on scripted engines (``test_scheduler.ScriptedEngine``)
whose step-time model is known, so the expected numbers follow from the
model and the queue, not from timings; the header, ``/v1/flex/status`` and
the accuracy metrics are checked on a real gateway in front of the sim engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Gateway, sim_engine, sim_model_id, wait_for
from flexserve.api.metrics import GatewayMetrics
from flexserve.api.pipeline import format_seconds
from flexserve.engines.base import EngineRequest, StepTimeModel
from flexserve.errors import ResourceUnavailableError
from flexserve.scheduler.drain import PROGRESS_DELTAS, build_timeline, remaining_seconds
from flexserve.scheduler.replicas import Running
from flexserve.scheduler.policy import SchedulerConfig
from flexserve.scheduler.estimates import (
    PRIOR_RUNS,
    PRIOR_SAMPLE,
    PRIOR_SIGMA_GUESS,
    PRIOR_TPOT,
    FlexHistory,
    DrainTimeline,
    ServiceCalibration,
    Z90,
    retry_after,
)
from flexserve.scheduler.flex_waits import place_key
from flexserve.scheduler.scheduler import Scheduler, Ticket
from flexserve.tiers import ServiceTier
from test_scheduler import MODEL, ScriptedEngine, make_scheduler, run, until

# --- the timeline and its learning, as pure arithmetic -------------------------------


def test_timeline_places_each_request_on_the_slot_that_frees_first() -> None:
    timeline = DrainTimeline([0.0, 0.0, 3.0, 1.0], period=10.0)
    assert timeline.num_slots == 4
    assert [timeline.wait(j).p50 for j in range(2)] == [0.0, 0.0]  # type: ignore[union-attr]
    # Then the slots in the order they free, then a period later each.
    waits = [timeline.wait(j).p50 for j in range(2, 9)]  # type: ignore[union-attr]
    assert waits == [1.0, 3.0, 10.0, 10.0, 11.0, 13.0, 20.0]
    assert DrainTimeline([], 1.0).wait(0) is None  # no slot flex can use: nothing to say


def test_the_spread_narrows_as_more_runs_must_end_first() -> None:
    timeline = DrainTimeline([1.0], period=1.0, sigma_scale=0.1, sigma_run=0.4)
    near, far = timeline.wait(0), timeline.wait(99)
    assert near is not None and far is not None
    assert near.p10 < near.p50 < near.p90
    assert far.p90 / far.p50 < near.p90 / near.p50  # single runs average out over a hundred
    assert far.sigma == pytest.approx(math.sqrt(0.1**2 + 0.4**2 / 100))
    assert far.p90 == pytest.approx(far.p50 * math.exp(Z90 * far.sigma))


def test_calibration_replaces_the_prior_with_the_first_runs_then_follows_drift() -> None:
    calibration = ServiceCalibration()
    assert calibration.scale == 1.0 and calibration.sigma_run(guessed=True) == PRIOR_SIGMA_GUESS
    calibration.observe(observed=0.2, predicted=1.0)
    assert calibration.scale == pytest.approx(0.2)  # one run says more than a guess
    for _ in range(3):
        calibration.observe(observed=0.2, predicted=1.0)
    assert calibration.sigma_run(guessed=True) < 0.6 and calibration.sigma_scale(guessed=True) < 0.6
    for _ in range(200):  # the engine got twice as slow
        calibration.observe(observed=0.4, predicted=1.0)
    assert calibration.scale == pytest.approx(0.4, rel=0.01)


def test_retry_after_is_the_places_p90_less_the_deadline() -> None:
    timeline = DrainTimeline([5.0], period=5.0, sigma_scale=0.2, sigma_run=0.2)
    estimate = timeline.wait(9)
    assert estimate is not None and estimate.p50 == pytest.approx(50.0)
    # Back then, its held place is within its deadline of the front unless
    # the drain runs slower than its p90.
    assert retry_after(estimate, 10.0) == pytest.approx(estimate.p90 - 10.0)
    assert retry_after(estimate, 1e6) == 1.0  # never less than a second


def test_places_freeing_together_are_told_one_start_apart() -> None:
    # Four slots free at 2 s, runs of 8 s: a start every 2 s once drained evenly.
    timeline = DrainTimeline([2.0] * 4, period=8.0, sigma_scale=0.1)
    waits = [timeline.wait(j) for j in range(4, 8)]
    places = [timeline.place(j) for j in range(4, 8)]
    assert {w.p50 for w in waits if w is not None} == {10.0}  # the same moment for all four
    assert [p.p50 for p in places if p is not None] == pytest.approx([10.0, 12.0, 14.0, 16.0])
    assert timeline.place(0) == timeline.wait(0)


def test_accuracy_metrics_count_waits_within_a_quarter_of_their_estimate() -> None:
    metrics = GatewayMetrics(Scheduler({}))
    for estimate, actual in ((10.0, 12.0), (10.0, 13.0), (10.0, 5.0), (0.0, 0.05), (0.0, 2.0)):
        metrics.observe_flex_wait("m", estimate, actual)
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples if s.labels.get("model") == "m"
    }
    assert samples[("flexserve_flex_estimate_measured_total", None)] == 5
    assert samples[("flexserve_flex_estimate_within_25pct_total", None)] == 2  # 12 s, and 0.05 s of 0
    assert samples[("flexserve_flex_wait_ratio_count", None)] == 3  # estimates above zero
    assert samples[("flexserve_flex_wait_ratio_bucket", "1.25")] == 2
    over = samples[("flexserve_flex_wait_over_estimate_seconds_total", None)]
    under = samples[("flexserve_flex_wait_under_estimate_seconds_total", None)]
    assert (over, under) == pytest.approx((2 + 3 + 0.05 + 2, 5))


def test_estimates_are_sent_with_three_significant_digits() -> None:
    assert [format_seconds(s) for s in (0, 0.012345, 4.5678, 61.04, 1234.5)] == [
        "0", "0.0123", "4.57", "61", "1230",
    ]
    # A tiny wait is still a wait (it was "0", which the metrics counted as one told).
    assert [format_seconds(s) for s in (4.2137e-05, 1e-9, 1e-10)] == ["0.0000421", "0.000000001", "0"]


# --- the estimator on scripted engines ------------------------------------------------

# One decode step every 2 ms, whatever the batch: a run of n tokens takes n steps.
STEP = StepTimeModel(0.002, 0.0, 0.0)


async def test_cold_start_burst_of_600_is_judged_on_the_drain_and_none_refused() -> None:
    """No flex before: the first estimates come from the step-time model, and
    a burst of 600 sent at once is queued whole (each told about the place it
    takes in the drain), not refused by a rate measured before it."""
    engine = ScriptedEngine(capacity=10, token_time=0.002, step_model=STEP)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    pool = scheduler.pools[MODEL]
    tasks = [
        asyncio.create_task(run(scheduler, f"f{i}", ServiceTier.FLEX, tokens=5, cost=5, max_wait=60))
        for i in range(600)
    ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)]  # no refusal
    estimates = [ticket.estimated_wait for ticket, _ in results]  # type: ignore[misc]
    assert all(e is not None for e in estimates)
    p50s = [e.p50 for e in estimates]  # type: ignore[union-attr]
    assert p50s[:10] == [0.0] * 10  # the free slots
    # One organization: its flow drains in order, ten at a time (10 slots)
    # every 10 ms (5-step runs), the first ten as the runs now in flight end.
    for index, p50 in enumerate(p50s[10:]):
        cycle = index // 10
        assert cycle * 0.01 < p50 <= (cycle + 1) * 0.01 + 1e-9, (index, p50)
    # The last has 589 ahead of it: 59 runs of 10 ms on its slot.
    assert p50s[-1] == pytest.approx(0.59, abs=0.01)
    assert pool.flex_history.calibration.num_observed == 600
    await scheduler.close()


async def test_an_organization_with_little_queued_goes_almost_first() -> None:
    engine = ScriptedEngine(capacity=2, token_time=10.0, step_model=STEP)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    pool = scheduler.pools[MODEL]
    tasks = [asyncio.create_task(run(scheduler, f"a{i}", ServiceTier.FLEX, cost=100, max_wait=600))
             for i in range(202)]
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 200)
    big = scheduler.estimate_flex_wait(pool, "org-a", 100)
    small = scheduler.estimate_flex_wait(pool, "org-b", 100)
    assert big is not None and small is not None
    # org-b's first request waits for one turn of org-a's (2,048 tokens: ~20 requests).
    assert small.p50 < big.p50 / 5
    timeline = build_timeline(pool, scheduler.config, time.monotonic())
    assert small.p50 == pytest.approx(timeline.wait(20).p50, rel=0.1)  # type: ignore[union-attr]
    # /v1/flex/status answers for the caller's organization: behind its own backlog.
    (own,) = scheduler.flex_status(org_id="org-a")
    (other,) = scheduler.flex_status(org_id="org-b")
    assert own["estimated_wait_seconds"] == pytest.approx(big.p50, rel=0.05, abs=1e-3)
    assert other["estimated_wait_seconds"] == pytest.approx(small.p50, rel=0.05, abs=1e-3)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await scheduler.close()


async def test_before_any_flex_run_the_service_time_is_corrected_by_defaults() -> None:
    # The model says 0.1 s a token; the engine takes 0.002 s: default runs show the
    # model's bias on this engine before any flex has run (a cold start's prior).
    engine = ScriptedEngine(capacity=4, token_time=0.002, step_model=StepTimeModel(0.1, 0.0, 0.0))
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    pool = scheduler.pools[MODEL]
    model_only = build_timeline(pool, scheduler.config, time.monotonic())
    await asyncio.gather(*(run(scheduler, f"d{i}", ServiceTier.DEFAULT, tokens=20, cost=120)
                           for i in range(4)))
    history = pool.flex_history
    assert history.prior_calibration.num_observed == 4 and history.calibration.num_observed == 0
    corrected = build_timeline(pool, scheduler.config, time.monotonic())
    assert corrected.period < 0.2 * model_only.period
    # Once flex has run, its own runs decide, and defaults are no longer timed.
    await run(scheduler, "f", ServiceTier.FLEX, tokens=20, cost=120)
    await run(scheduler, "d-after", ServiceTier.DEFAULT, tokens=20, cost=120)
    assert history.calibration.num_observed == 1 and history.prior_calibration.num_observed == 4
    await scheduler.close()


async def test_a_flex_run_that_has_streamed_ends_when_its_own_pace_says() -> None:
    engine = ScriptedEngine(capacity=4, token_time=10.0)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    replica = scheduler.pools[MODEL].replicas[0]
    held = Running(ServiceTier.FLEX, "org-a", cost_tokens=1_100, stream=True, prompt_tokens=100,
                   granted_at=0.0, expected_seconds=20.0)
    held.num_output = PROGRESS_DELTAS - 1  # too few deltas: its prediction, less the time run
    assert remaining_seconds(replica, held, 1.0, now=5.0) == pytest.approx(15.0)
    # 801 deltas in 8 s: 199 more of its 1,000 at 0.01 s each, from its latest
    # (1.49 s), weighted 0.801 against the prediction's 20 − 8.5 s.
    held.num_output, held.first_output_at, held.last_output_at = 801, 0.0, 8.0
    assert remaining_seconds(replica, held, 1.0, now=8.5) == pytest.approx(0.801 * 1.49 + 0.199 * 11.5)
    # An engine that streams two tokens a delta: 500 deltas in all; 201 in 8 s
    # leave 299 at 0.04 s (11.46 s), weighted 0.402.
    replica.tokens_per_delta = 2.0
    held.num_output = 201
    assert remaining_seconds(replica, held, 1.0, now=8.5) == pytest.approx(0.402 * 11.46 + 0.598 * 11.5)
    await scheduler.close()


async def test_before_any_flex_run_has_ended_the_pace_of_those_streaming_sets_the_drain() -> None:
    """No step-time model and no flex run ended yet: two flex runs streaming
    at 0.1 s a delta, 0.2 s after they were put on the replica, say a queued
    request of 256 output tokens (the prior typical one) holds its slot
    0.2 + 256 × 0.1 s — not the flat prior of 20 ms a token."""
    engine = ScriptedEngine(capacity=4, token_time=10.0)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    pool = scheduler.pools[MODEL]
    replica = pool.replicas[0]
    now = time.monotonic()
    assert build_timeline(pool, scheduler.config, now).period == pytest.approx(256 * PRIOR_TPOT)
    for _ in range(2):
        streaming = Running(ServiceTier.FLEX, "org-a", cost_tokens=1_000, stream=True, prompt_tokens=100)
        replica.add(streaming, now - 1.2)
        streaming.num_output, streaming.first_output_at, streaming.last_output_at = 11, now - 1.0, now
    assert build_timeline(pool, scheduler.config, now).period == pytest.approx(0.2 + 256 * 0.1)
    await scheduler.close()


def test_default_runs_are_timed_for_the_prior_first_then_sampled_and_not_after_flex() -> None:
    history = FlexHistory()
    timed = [history.times_default_run() for _ in range(PRIOR_RUNS + 4 * PRIOR_SAMPLE)]
    assert timed[:PRIOR_RUNS] == [True] * PRIOR_RUNS
    assert sum(timed[PRIOR_RUNS:]) == 4
    history.calibration.observe(1.0, 2.0)  # a flex run was seen
    assert not any(history.times_default_run() for _ in range(4 * PRIOR_SAMPLE))


def test_the_output_flex_got_while_it_waited_is_learned_only_from_a_backlog() -> None:
    history = FlexHistory()
    assert history.output_rate_cap() is None
    history.observe_backlog(0.0, False, 0)
    for second in range(1, 31):  # half a minute without a backlog: says nothing of capacity
        history.output_done += 40
        history.observe_output(40, 80)
        history.observe_backlog(float(second), False, 0)
    assert history.output_rate_cap() is None
    for second in range(31, 51):  # then twenty seconds of backlog, 100 tokens a second
        history.output_done += 100
        history.observe_output(100, 200)
        history.observe_backlog(float(second), True, 0)
    assert history.output_rate_cap() == pytest.approx(100.0)
    assert history.output_share == pytest.approx(0.5, rel=0.2)  # runs stop halfway


def test_the_output_flex_got_is_a_mean_over_the_backlog_not_its_first_look() -> None:
    history = FlexHistory()
    history.observe_backlog(0.0, False, 0)
    history.output_done += 100  # the first look of a burst: 10 ms, 100 tokens (10,000 a second)
    history.observe_backlog(0.01, True, 0)
    now = 0.01
    while now < 16.0:  # then 1,000 tokens a second, looked at every half second
        now += 0.5
        history.output_done += 500
        history.observe_backlog(now, True, 0)
    cap = history.output_rate_cap()
    assert cap is not None and cap == pytest.approx(1_000, rel=0.02)


def saw_flex_get(history: FlexHistory, tokens_per_second: float, seconds: float = 60.0) -> None:
    """``history`` saw flex get ``tokens_per_second`` over ``seconds`` of backlog, just now."""
    now = time.monotonic()
    history.observe_backlog(now - seconds, True, 0)
    history.output_done += round(tokens_per_second * seconds)
    history.observe_backlog(now, True, 0)


async def test_the_queued_works_output_is_the_mean_of_its_output_limits() -> None:
    """Flex of 900 + 100 and 100 + 200 tokens (prompt + output limit) queued
    half and half: each of 10 slots restarts every 10 × 150 / 500 s once
    flex was seen to get 500 output tokens a second. (A mean of each
    request's prompt share, 0.9 and 0.33, would have made it 250 tokens.)"""
    engine = ScriptedEngine(capacity=10, token_time=10.0, step_model=STEP)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    pool = scheduler.pools[MODEL]

    async def flex(i: int) -> None:
        prompt, cost = (900, 1000) if i % 2 else (100, 300)
        ticket = Ticket(f"f{i}", MODEL, ServiceTier.FLEX, "org-a", prompt_tokens=prompt, cost_tokens=cost,
                        max_wait=600)
        async for _ in scheduler.stream(ticket, EngineRequest.chat(f"f{i}", MODEL, [], max_tokens=2)):
            pass

    tasks = [asyncio.create_task(flex(i)) for i in range(30)]
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 20)
    assert pool.queue.flex_tokens() == (10 * 1000 + 10 * 300, 10 * 900 + 10 * 100, 20)
    history = pool.flex_history
    saw_flex_get(history, 500.0)
    timeline = build_timeline(pool, scheduler.config, time.monotonic())
    assert timeline.period == pytest.approx(10 * 150 / 500, rel=0.05)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 0)
    assert pool.queue.flex_tokens() == (0, 0, 0)
    await scheduler.close()


async def test_the_drain_is_no_faster_than_flex_was_seen_to_get() -> None:
    """The step-time model says 10 ms runs on 10 slots; flex was seen to get
    only 500 output tokens a second while it waited (100 runs of 5 tokens):
    the timeline drains at that pace, not the model's."""
    engine = ScriptedEngine(capacity=10, token_time=10.0, step_model=STEP)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    pool = scheduler.pools[MODEL]
    tasks = [asyncio.create_task(run(scheduler, f"f{i}", ServiceTier.FLEX, cost=5, max_wait=600))
             for i in range(30)]
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 20)
    now = time.monotonic()
    model_only = build_timeline(pool, scheduler.config, now)
    history = pool.flex_history
    saw_flex_get(history, 500.0)
    capped = build_timeline(pool, scheduler.config, now)
    # Ten slots, each restarting every 10 × 5 / 500 s = 0.1 s.
    assert capped.period == pytest.approx(0.1, rel=0.05)
    assert capped.period > 5 * model_only.period
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await scheduler.close()


async def test_clients_reading_the_status_together_are_told_their_places_and_get_them() -> None:
    """Clients of one organization that read `/v1/flex/status` at the same
    moment are each told the wait of their own place, held for them: sent in
    the opposite order, naming their places, each is queued where it read; a
    request naming no place lets go of the oldest read's place."""
    engine = ScriptedEngine(capacity=2, token_time=10.0, step_model=STEP)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    pool = scheduler.pools[MODEL]
    busy = [asyncio.create_task(run(scheduler, f"b{i}", ServiceTier.FLEX, org="org-b", cost=100,
                                    max_wait=600)) for i in range(2)]
    await until(lambda: pool.num_in_flight_of(ServiceTier.FLEX) == 2)
    reads = [scheduler.flex_status(model=MODEL, org_id="org-a")[0] for _ in range(5)]
    timeline = build_timeline(pool, scheduler.config, time.monotonic())
    expected = [timeline.wait(j).p50 for j in range(5)]  # type: ignore[union-attr]
    assert [r["estimated_wait_seconds"] for r in reads] == pytest.approx(expected, rel=0.05, abs=1e-3)
    assert len({r["place"] for r in reads}) == 5 and len(pool.holds) == 5
    assert scheduler.flex_status()[0]["place"] is None  # a read of every model holds nothing
    tickets = [Ticket(f"a{j}", MODEL, ServiceTier.FLEX, "org-a", cost_tokens=100, max_wait=600,
                      place=place_key(reads[j]["place"])) for j in range(5)]
    sent = []
    for j in reversed(range(5)):  # the last reader sends first
        ticket = tickets[j]
        # Its place has the j earlier readers' places ahead of it (the queue has
        # moved on a little since the reads: the wait of that place now).
        expected_now = build_timeline(pool, scheduler.config, time.monotonic()).wait(j)
        sent.append(asyncio.create_task(_drain(scheduler.stream(ticket, EngineRequest.chat(
            ticket.request_id, MODEL, [], max_tokens=2)))))
        await until(lambda ticket=ticket: ticket.estimated_wait is not None)  # type: ignore[misc]
        assert expected_now is not None and ticket.estimated_wait is not None
        assert ticket.estimated_wait.p50 == pytest.approx(expected_now.p50, rel=0.02, abs=0.01)
    assert len(pool.holds) == 0
    # A read, then a request of the organization naming no place: the read's place goes.
    scheduler.flex_status(model=MODEL, org_id="org-a")
    sent.append(asyncio.create_task(run(scheduler, "plain", ServiceTier.FLEX, org="org-a", max_wait=600)))
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 6)
    assert len(pool.holds) == 0
    for task in [*busy, *sent]:
        task.cancel()
    await asyncio.gather(*busy, *sent, return_exceptions=True)
    await scheduler.close()


async def _drain(deltas: Any) -> None:
    async for _ in deltas:
        pass


async def test_step_change_in_default_load_halves_the_drain_once_smoothed() -> None:
    engine = ScriptedEngine(capacity=10, token_time=10.0, step_model=STEP)
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    pool = scheduler.pools[MODEL]
    flex = [asyncio.create_task(run(scheduler, f"f{i}", ServiceTier.FLEX, cost=100, max_wait=600))
            for i in range(60)]
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 50)
    now = time.monotonic()
    before = build_timeline(pool, scheduler.config, now)
    assert before.num_slots == 10
    # Default takes half the replica: its runs preempt flex and hold five slots.
    default = [asyncio.create_task(run(scheduler, f"d{i}", ServiceTier.DEFAULT, tokens=3))
               for i in range(5)]
    await until(lambda: pool.num_in_flight_of(ServiceTier.DEFAULT) == 5)
    now = time.monotonic()
    moment = build_timeline(pool, scheduler.config, now)
    assert moment.num_slots > 5  # a moment of default load is not yet its share
    for step in range(1, 11):  # ten seconds of the new load, looked at each second
        after = build_timeline(pool, scheduler.config, now + step)
    # The five preemptions paused flex once: a little longer per run, as a share of a minute.
    assert after.num_slots == 5 and after.period == pytest.approx(before.period, rel=0.03)
    assert pool.num_preemptions == 5 and pool.num_cooldowns == 1
    # Far down the line, where the runs now in flight no longer count, the wait doubles.
    ahead = 500
    assert after.wait(ahead).p50 / before.wait(ahead).p50 == pytest.approx(2.0, rel=0.05)  # type: ignore[union-attr]
    for task in [*flex, *default]:
        task.cancel()
    await asyncio.gather(*flex, *default, return_exceptions=True)
    await scheduler.close()


async def test_a_replica_lost_and_back_changes_the_drain() -> None:
    engines = [ScriptedEngine(capacity=4, token_time=10.0, step_model=STEP) for _ in range(2)]
    for number, engine in enumerate(engines):
        engine.name = f"scripted-{number}"
    scheduler = Scheduler.from_engines(engines, SchedulerConfig(flex_headroom=0.0, scrape_interval=0.01))
    await scheduler.start()
    await asyncio.sleep(0.03)
    pool = scheduler.pools[MODEL]
    tasks = [asyncio.create_task(run(scheduler, f"f{i}", ServiceTier.FLEX, cost=100, max_wait=600))
             for i in range(48)]
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 40)
    both = scheduler.estimate_flex_wait(pool, "org-b", 100)
    pool.replicas[1].healthy = False  # as its load watch marks a replica that stops answering
    one = scheduler.estimate_flex_wait(pool, "org-b", 100)
    assert both is not None and one is not None
    assert one.p50 > 1.5 * both.p50
    pool.replicas[1].healthy = True
    again = scheduler.estimate_flex_wait(pool, "org-b", 100)
    assert again is not None and again.p50 == pytest.approx(both.p50, rel=0.05)
    for replica in pool.replicas:
        replica.healthy = False
    assert scheduler.estimate_flex_wait(pool, "org-b", 100) is None  # nothing to estimate from
    for replica in pool.replicas:
        replica.healthy = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await scheduler.close()


async def test_clients_refused_together_are_told_to_return_at_the_drains_pace() -> None:
    # Runs of 100 tokens at 0.1 s a step hold a slot 10 s; two slots.
    engine = ScriptedEngine(capacity=2, token_time=10.0, step_model=StepTimeModel(0.1, 0.0, 0.0))
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    pool = scheduler.pools[MODEL]
    backlog = [asyncio.create_task(run(scheduler, f"b{i}", ServiceTier.FLEX, cost=100, max_wait=600))
               for i in range(22)]
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 20)
    first = build_timeline(pool, scheduler.config, time.monotonic()).wait(20)
    refused: list[float] = []
    for i in range(10):
        with pytest.raises(ResourceUnavailableError) as caught:
            await run(scheduler, f"r{i}", ServiceTier.FLEX, org="org-a", cost=100, max_wait=1.0)
        refused.append(caught.value.retry_after)
    assert first is not None
    assert refused[0] == pytest.approx(retry_after(first, 1.0), rel=0.02)
    # Each is told about the place it would take behind those refused before
    # it, at the drain's pace (a start every 5 s: 10 s runs on two slots),
    # although both slots free at one moment: none at the same moment.
    gaps = [later - earlier for earlier, later in zip(refused, refused[1:], strict=False)]
    assert all(gap > 4.0 for gap in gaps), gaps
    assert len({math.ceil(seconds) for seconds in refused}) == len(refused)
    for task in backlog:
        task.cancel()
    await asyncio.gather(*backlog, return_exceptions=True)
    await scheduler.close()


async def test_accepting_is_judged_against_the_clients_deadline() -> None:
    engine = ScriptedEngine(capacity=2, token_time=10.0, step_model=StepTimeModel(0.1, 0.0, 0.0))
    scheduler = await make_scheduler(engine, flex_headroom=0.0, flex_max_wait=600)
    pool = scheduler.pools[MODEL]
    (idle,) = scheduler.flex_status(max_wait=0)
    assert idle["accepting"] and idle["estimated_wait_seconds"] == 0.0  # a slot is free now
    backlog = [asyncio.create_task(run(scheduler, f"b{i}", ServiceTier.FLEX, cost=100, max_wait=600))
               for i in range(12)]
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 10)
    (server,) = scheduler.flex_status()
    (patient,) = scheduler.flex_status(max_wait=300)
    (hurried,) = scheduler.flex_status(max_wait=5)
    assert server["accepting"] and patient["accepting"] and not hurried["accepting"]
    # An organization with nothing queued: one turn of org-a's before it (10 of 100 tokens).
    assert 10 < server["estimated_wait_seconds"] < server["estimated_wait_p90_seconds"]
    # What status says is what admission does.
    with pytest.raises(ResourceUnavailableError):
        await run(scheduler, "hurried", ServiceTier.FLEX, org="org-b", cost=100, max_wait=5)
    for task in backlog:
        task.cancel()
    await asyncio.gather(*backlog, return_exceptions=True)
    await scheduler.close()


# --- on a real gateway ---------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Label this record."}]


def _metric(gateway: Gateway, name: str, model: str) -> float:
    with gateway.http() as http:
        text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == model:
                return float(sample.value)
    return 0.0


def test_every_flex_answer_carries_its_estimate_and_the_metrics_count_it(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_gateway(engines=[sim_engine(speed=50.0, max_num_seqs=4)], engine="sim", flex_headroom=0.0)
    model = sim_model_id(gateway)
    answers: list[httpx.Response] = []

    def send(stream: bool) -> None:
        with gateway.http() as http:
            body = {"model": model, "messages": MESSAGES, "max_tokens": 20, "service_tier": "flex",
                    "stream": stream}
            response = http.post("/v1/chat/completions", json=body, timeout=60)
            answers.append(response)

    threads = [threading.Thread(target=send, args=(i % 2 == 0,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in answers] == [200] * 16
    estimates = [float(r.headers["x-flex-estimated-wait"]) for r in answers]
    assert min(estimates) == 0.0 and all(e >= 0 for e in estimates)
    wait_for(lambda: _metric(gateway, "flexserve_flex_estimate_measured_total", model) == 16)
    within = _metric(gateway, "flexserve_flex_estimate_within_25pct_total", model)
    assert 0 < within <= 16  # those admitted at once were told 0 and waited no time
    assert _metric(gateway, "flexserve_flex_wait_ratio_count", model) == sum(e > 0 for e in estimates)


def test_status_and_refusals_answer_for_the_clients_deadline(start_gateway: Callable[..., Gateway]) -> None:
    """Two long flex streams hold both slots: status answers per deadline, and a
    request whose deadline even the optimistic estimate misses is refused at
    once with the estimate and a Retry-After."""
    gateway = start_gateway(engines=[sim_engine(speed=1.0, max_num_seqs=2)], engine="sim", flex_headroom=0.0)
    model = sim_model_id(gateway)
    with every_slot_held(gateway, model, 2), gateway.http() as http:
        (server,) = http.get("/v1/flex/status", params={"model": model}).json()["data"]
        (hurried,) = http.get("/v1/flex/status", params={"model": model, "max_wait": 1}).json()["data"]
        (by_header,) = http.get("/v1/flex/status", headers={"X-Flex-Max-Wait": "1"}).json()["data"]
        (query_wins,) = http.get("/v1/flex/status", params={"max_wait": 600},
                                 headers={"X-Flex-Max-Wait": "1"}).json()["data"]
        bad = http.get("/v1/flex/status", params={"max_wait": "soon"})
        unknown = http.get("/v1/flex/status", params={"model": "no-such-model"})
        refused = http.post("/v1/chat/completions", headers={"X-Flex-Max-Wait": "1"}, json={
            "model": model, "messages": MESSAGES, "max_tokens": 5, "service_tier": "flex"})
    assert server["accepting"] and query_wins["accepting"]
    assert not hurried["accepting"] and not by_header["accepting"]
    assert 1 < server["estimated_wait_seconds"] < server["estimated_wait_p90_seconds"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_wait"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "resource_unavailable"
    told = float(refused.headers["x-flex-estimated-wait"])
    assert told > 1 and int(refused.headers["retry-after"]) >= 1


@contextlib.contextmanager
def every_slot_held(gateway: Gateway, model: str, num_slots: int) -> Iterator[None]:
    """Long flex streams (read and dropped) on every one of the model's slots,
    until the block ends."""
    stop = threading.Event()

    def hold() -> None:
        with gateway.http() as http, http.stream(
            "POST", "/v1/chat/completions", timeout=60,
            json={"model": model, "messages": MESSAGES, "max_tokens": 4000, "stream": True,
                  "service_tier": "flex"},
        ) as response:
            for _ in response.iter_bytes():
                if stop.is_set():
                    break

    holders = [threading.Thread(target=hold) for _ in range(num_slots)]
    for thread in holders:
        thread.start()
    try:
        wait_for(lambda: flex_gauge(gateway, "flexserve_in_flight", model) == num_slots)
        yield
    finally:
        stop.set()
        for thread in holders:
            thread.join(timeout=30)


def flex_gauge(gateway: Gateway, name: str, model: str) -> float:
    """A gauge of ``/metrics`` labelled with the model and the flex tier."""
    with gateway.http() as http:
        text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == {"model": model, "tier": "flex"}:
                return float(sample.value)
    return 0.0


def test_under_a_tpot_slo_a_deep_backlogs_waits_are_estimated_as_they_drain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With `tpot_slo`, the prefill budget paces flex starts. The drain must
    be paced at the rate the budget settles at, not at the rate it would give
    with every flex slot full (then the SLO leaves prefill almost nothing,
    and 128 sequences' waits were estimated 3x too long; 256's, 100x, and
    most of the backlog was refused). On the planner's virtual clock: a
    sim replica, default at 1.5/s, a backlog of 128 flex clients."""
    from flexserve.plan import simulate as plan

    tickets: list[Any] = []
    make = plan._Run._request

    def keep(run: Any, job: Any, tier: Any, name: str) -> Any:
        ticket, request = make(run, job, tier, name)
        tickets.append(ticket)
        return ticket, request

    monkeypatch.setattr(plan._Run, "_request", keep)
    window = plan.Window(plan.Replica(max_num_seqs=128, cost_model="calibrated"), default_rate=1.5,
                         duration=30, warmup=10, flex_clients=128,
                         scheduler=SchedulerConfig(tpot_slo=0.015))
    outcome = plan.simulate(window)
    ratios = sorted(
        (t.admitted_at - t.enqueued_at) / t.estimated_wait.p50 for t in tickets
        if t.tier is ServiceTier.FLEX and t.estimated_wait is not None and t.admitted_at is not None
        and t.estimated_wait.p50 > 1.0
    )
    assert len(ratios) > 300 and outcome.flex_refused == 0
    assert 0.67 < ratios[len(ratios) // 2] < 1.5, ratios[len(ratios) // 2]
