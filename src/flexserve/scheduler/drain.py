"""The flex drain timeline of one model, read off its replicas now.

``estimates.py`` says what the estimate is and why; this module gathers its
inputs from the pool — slots per replica, the runs holding them, the
queued work and the step-time models — and builds the ``DrainTimeline``.
"""

from __future__ import annotations

import math

from flexserve.scheduler.estimates import (
    PRIOR_TPOT,
    RULE_SMOOTHING,
    SLOT_SMOOTHING,
    DrainTimeline,
    WaitEstimate,
)
from flexserve.scheduler.policy import SchedulerConfig, flex_room, predicted_tpot
from flexserve.scheduler.replicas import ModelPool, Replica, Running
from flexserve.tiers import ServiceTier

# A run past its predicted end is expected to end within this share of it.
_OVERDUE_SHARE = 0.05
# Output deltas a run streams before its own pace predicts when it ends.
PROGRESS_DELTAS = 4
# Most steps forward in time when counting held places ahead of a request
# (each counts the clients due back within the wait the step before found).
_HOLD_STEPS = 16


def flex_slots(replica: Replica, limit: int, *, backlog: bool, cooldown: float, now: float) -> float:
    """Slots that serve flex on ``replica``, smoothed over ``SLOT_SMOOTHING``
    seconds while flex waits, ``RULE_SMOOTHING`` otherwise (updated on every look).

    While flex waits, flex takes every slot it may, so the slots are what it
    holds: that counts what the rule ``limit − default in flight`` misses —
    flex admitted in a lull keeps running while default spills into the
    headroom. Without a backlog there is nothing to observe, and the rule is
    the answer. Nor is there while a preemption's cooldown keeps flex off the
    replica: those pauses are counted apart (``FlexHistory.stall_share``),
    and the slots keep their value until it ends."""
    if backlog and now - replica.last_preempted_at < cooldown and replica.flex_slots_seen_at is not None:
        return replica.flex_slots_smoothed
    flex_running = sum(1 for run in replica.running if run.tier.is_preemptible and not run.preempted)
    if backlog:
        current = float(flex_running)
    else:
        current = float(max(0, limit - (replica.num_in_flight - flex_running)))
    last = replica.flex_slots_seen_at
    if last is None or now - last > 10 * RULE_SMOOTHING:
        replica.flex_slots_smoothed = current
    elif now > last:
        weight = 1.0 - math.exp(-(now - last) / (SLOT_SMOOTHING if backlog else RULE_SMOOTHING))
        replica.flex_slots_smoothed += weight * (current - replica.flex_slots_smoothed)
    replica.flex_slots_seen_at = now
    return replica.flex_slots_smoothed


def flex_limit(config: SchedulerConfig, replica: Replica, cost_tokens: float) -> int:
    """Most sequences a replica runs while flex may still be released onto it:
    capacity less headroom, fewer where a TPOT SLO caps the batch, and no
    more than decode at once on engines that pause flex between tokens."""
    if not config.tiers_enabled:
        return replica.capacity
    limit = flex_room(config, replica)
    if replica.engine.supports_pause:
        limit = min(limit, replica.engine.max_decoding)
    if config.tpot_slo > 0 and replica.engine.step_time_model() is not None:
        low, high = 0, limit  # the step time grows with the batch: bisect for the SLO
        while low < high:
            middle = (low + high + 1) // 2
            step = predicted_tpot(replica, middle, int(middle * cost_tokens))
            if step is not None and step <= config.tpot_slo:
                low = middle
            else:
                high = middle - 1
        limit = low
    return limit


def service_seconds(replica: Replica, prompt_tokens: float, output_tokens: float, batch: int) -> float:
    """Predicted seconds a flex run of this size holds its slot on ``replica``
    running ``batch`` sequences (before the learned correction)."""
    model = replica.engine.step_time_model()
    if model is None:
        return max(1.0, output_tokens) * PRIOR_TPOT
    held = int(max(1, batch) * (prompt_tokens + output_tokens / 2))
    step = model.step_time(max(1, batch), held) * replica.tpot_scale
    return model.a * prompt_tokens * replica.prompt_scale + max(1.0, output_tokens) * step


def expected_run_seconds(
    config: SchedulerConfig, replica: Replica, run: Running, *, backlog: bool
) -> float:
    """What a flex run just released onto ``replica`` is predicted to take, at
    the batch it will share: the flex limit while flex waits (the replica
    fills up around it), else what is on the replica now, itself included."""
    output = max(1, run.cost_tokens - run.prompt_tokens)
    batch = max(replica.num_in_flight, 1)
    if backlog:
        batch = max(batch, flex_limit(config, replica, run.cost_tokens))
    return service_seconds(replica, run.prompt_tokens, output, batch)


def remaining_seconds(replica: Replica, run: Running, scale: float, now: float) -> float:
    """Seconds until a flex run ends and frees its slot: what it was predicted
    to take, less the time it has run (an overdue run is expected to end
    within a small share of its prediction), and, once it has streamed
    ``PROGRESS_DELTAS`` deltas, what its own pace says (the deltas left of
    its output limit at the seconds each has taken so far), weighted by the
    share of its output streamed: a pace read early in a run is swayed by
    a moment's stall; near its end, it is what says which slot frees first."""
    expected = run.expected_seconds * scale
    predicted = max(expected - (now - run.granted_at), _OVERDUE_SHARE * expected)
    if run.num_output < PROGRESS_DELTAS:
        return predicted
    limit = (run.cost_tokens - run.prompt_tokens) / replica.delta_tokens(run.chunked)
    paced = max(0.0, (limit - run.num_output) * run.seconds_per_delta - (now - run.last_output_at))
    share = min(1.0, run.num_output / max(1.0, limit))
    return share * paced + (1.0 - share) * predicted


def _live_period(replica: Replica, output_tokens: float) -> float | None:
    """Before any flex run has ended: what a run of ``output_tokens`` takes at
    the pace the flex runs streaming on ``replica`` keep now (their mean time
    to a first delta, then their mean seconds per delta). A cold burst's
    runs show it within a fraction of a second, at the batch they share —
    which no prior learned from lighter traffic knows. None if none has
    streamed ``PROGRESS_DELTAS`` deltas."""
    firsts = paces = 0.0
    count = 0
    for run in replica.running:
        if run.tier.is_preemptible and not run.preempted and run.num_output >= PROGRESS_DELTAS:
            firsts += run.first_output_at - run.granted_at
            paces += run.seconds_per_delta / replica.delta_tokens(run.chunked)
            count += 1
    if count == 0:
        return None
    return (firsts + paces * output_tokens) / count


def _guessed(pool: ModelPool) -> bool:
    return any(r.engine.step_time_model() is None for r in pool.replicas)


def build_timeline(pool: ModelPool, config: SchedulerConfig, now: float) -> DrainTimeline:
    """The drain of ``pool``'s flex queue as of ``now``."""
    history = pool.flex_history
    fair_tokens, prompt_tokens, num_queued = pool.queue.flex_tokens()
    if num_queued:
        cost, prompt = fair_tokens / num_queued, prompt_tokens / num_queued
    else:
        cost, prompt = history.typical_cost, history.typical_prompt
    output = max(1.0, cost - prompt)
    calibration = history.calibration
    scale = calibration.scale if calibration.num_observed else history.prior_calibration.scale
    free_at: list[float] = []
    weighted_period = 0.0
    num_slots_total = 0
    urgent_total = 0.0
    start_rate_cap = 0.0
    paced = config.tpot_slo > 0
    for replica in pool.replicas:
        if not replica.healthy:
            continue
        limit = flex_limit(config, replica, cost)
        smoothed = flex_slots(
            replica, limit, backlog=num_queued > 0, cooldown=config.preempt_cooldown, now=now
        )
        num_slots = max(0, round(smoothed))
        if num_slots == 0:
            continue
        urgent = max(0, limit - num_slots)
        batch = max(replica.num_in_flight + 1, limit) if num_queued else replica.num_in_flight + 1
        period = service_seconds(replica, prompt, output, batch) * scale
        if not calibration.num_observed:
            period = _live_period(replica, output) or period
        num_free = max(0, min(num_slots, limit - replica.num_in_flight))
        residuals = sorted(
            remaining_seconds(replica, run, scale, now)
            for run in replica.running
            if run.tier.is_preemptible and not run.preempted
        )
        times = [0.0] * num_free + residuals[: num_slots - num_free]
        # Slots default holds beyond its usual share free as its runs end.
        times += [period / 2] * (num_slots - len(times))
        pause = max(0.0, replica.backoff_until - now)
        free_at.extend(max(t, pause) for t in times)
        weighted_period += period * num_slots
        num_slots_total += num_slots
        urgent_total += urgent
        if paced:
            start_rate_cap += _prefill_start_rate(config, replica, prompt, output, limit, cost, scale)
    if num_slots_total == 0:
        return DrainTimeline([], 0.0)
    guessed = _guessed(pool)
    min_interval = 1.0 / start_rate_cap if paced and start_rate_cap > 0 else 0.0
    num_replicas = sum(1 for r in pool.replicas if r.healthy)
    stall = history.stall_share(config.preempt_cooldown, num_replicas) if config.tiers_enabled else 0.0
    period = weighted_period / num_slots_total / (1.0 - stall)
    # Once measured, the drain is what flex has been seen to get while it
    # waited: the output it got then, over what the queued work will generate.
    cap = history.output_rate_cap()
    if cap is not None:
        period = num_slots_total * output * history.output_share / cap
    return DrainTimeline(
        free_at, period, min_interval=min_interval,
        sigma_scale=calibration.sigma_scale(guessed), sigma_run=calibration.sigma_run(guessed),
        sigma_slots=math.sqrt(urgent_total) / num_slots_total,
        stall_rate=history.preemption_rate / max(1, num_replicas), stall_seconds=config.preempt_cooldown,
    )


def _prefill_start_rate(
    config: SchedulerConfig, replica: Replica, prompt: float, output: float, limit: int, cost: float,
    scale: float = 1.0,
) -> float:
    """Flex starts per second the prefill budget allows on ``replica``
    (``scheduler/prefill.py``); unbounded is returned as a large rate.

    The budget earns ``1 - step(n) / tpot_slo`` of each second, ``step(n)``
    the TPOT of the ``n`` sequences running: the fewer run, the faster flex
    starts. It settles where starts at that rate, each running for its
    service time, keep ``n`` running (Little's law): the largest ``n`` up to
    ``limit`` the rate at ``n`` sustains. (The rate at ``limit`` alone, where
    the SLO leaves prefill almost nothing, made waits 10-100x too long.)"""
    seconds = replica.prefill_seconds(int(prompt))
    if seconds <= 0 or predicted_tpot(replica, 1, int(cost)) is None:
        return 1e9

    def rate(n: int) -> float:
        step = predicted_tpot(replica, n, int(n * cost)) or 0.0
        return max(0.0, 1.0 - step / config.tpot_slo) / seconds

    low, high = 1, max(1, limit)
    while low < high:
        middle = (low + high + 1) // 2
        if rate(middle) * service_seconds(replica, prompt, output, middle) * scale >= middle:
            low = middle
        else:
            high = middle - 1
    return rate(low)


def observe(pool: ModelPool, config: SchedulerConfig, now: float) -> None:
    """What the estimates learn at every load reading: the slots flex has,
    and the time flex waits and the preemption pauses in it."""
    history = pool.flex_history
    backlog = pool.queue.num_waiting(ServiceTier.FLEX) > 0
    history.observe_backlog(now, backlog, pool.num_cooldowns)
    if not config.tiers_enabled:
        return
    for replica in pool.replicas:
        if replica.healthy:
            limit = flex_limit(config, replica, history.typical_cost)
            # Kept smooth between estimates.
            flex_slots(replica, limit, backlog=backlog, cooldown=config.preempt_cooldown, now=now)


def requests_ahead(
    pool: ModelPool, org_id: str, cost_tokens: int, now: float, *, front: bool = False,
    before: float | None = None, due_by: float | None = None,
) -> int:
    """Requests released before a flex request from ``org_id`` joining now
    (at the back of its flow, at its ``front``, or at its place by arrival
    ``before``): default and priority waiting, and the flex the fair queue
    releases first — its organization's places held for refused requests
    included (``holds.py``; with ``due_by``, those whose clients are due back by then)."""
    queue = pool.queue
    held = 0 if front else pool.holds.tokens_ahead(org_id, now, before, due_by=due_by)
    flex = queue.flex_requests_ahead(org_id, cost_tokens, front=front, before=before, held_tokens=held)
    if not queue.tiers_enabled:
        return flex  # one line by arrival: everything waiting is counted there
    return queue.num_waiting(ServiceTier.PRIORITY) + queue.num_waiting(ServiceTier.DEFAULT) + flex


def wait_in_queue(
    timeline: DrainTimeline, pool: ModelPool, org_id: str, cost_tokens: int, now: float,
    *, front: bool = False, before: float | None = None,
) -> WaitEstimate | None:
    """The wait of a flex request from ``org_id`` joining now (at the back,
    the ``front``, or its place by arrival ``before``). A place held for a
    refused request ahead of it counts only if its client is due back before
    it starts; one due later finds it gone. Its start is found by stepping
    forward in time: the wait counting the places whose clients are due
    now, then those due within that wait, and so on until no more come due
    — the first moment the request's turn comes. (Counting every place
    first, then those due within that longer wait, counted clients due
    after the request had started: a retry near the front was told 0.3–0.6 s
    and started at the next free slot, 0.0–0.2 s later.)"""
    if front or not pool.holds:
        return timeline.wait(requests_ahead(pool, org_id, cost_tokens, now, front=front, before=before))
    due_by = now
    counted = -1
    estimate = None
    for _ in range(_HOLD_STEPS):
        ahead = requests_ahead(pool, org_id, cost_tokens, now, before=before, due_by=due_by)
        if ahead == counted:
            break
        counted = ahead
        estimate = timeline.wait(ahead)
        if estimate is None:
            break
        due_by = now + estimate.p50
    return estimate


def estimate_for(
    pool: ModelPool, config: SchedulerConfig, now: float, org_id: str, cost_tokens: int,
    *, front: bool = False,
) -> WaitEstimate | None:
    """The wait of a flex request from ``org_id`` joining ``pool``'s queue now."""
    timeline = build_timeline(pool, config, now)
    return wait_in_queue(timeline, pool, org_id, cost_tokens, now, front=front)
