"""A day of a fleet: how much flex it sells beside the day's default traffic
within the SLO, hour by hour; and the smallest fleet that sells a target.

A fleet is ``replicas`` identical replicas; the gateway spreads default
traffic over them, so each is planned as one replica taking ``1/replicas``
of each hour's arrivals (a Poisson stream split at random stays Poisson;
the scheduler's least-loaded choice does a little better, so this errs on
the safe side).

The day's per-replica rates are covered by ``levels`` simulated load levels
(``simulate.py``, on the virtual clock), from the quietest hour to the
busiest; an hour between two levels takes the straight line between them.
At each level the flex policy starts from the given settings; while
default's p99 TTFT or TPOT misses the SLO, the level is simulated again
with more of each replica kept from flex (``flex_headroom`` up the
``HEADROOMS`` ladder). An hour is sold at the first setting that holds the
SLO; if none does (default alone does not fit), it sells no flex and the
plan says the fleet is too small.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flexserve.plan.simulate import Outcome, Window, simulate
from flexserve.plan.traffic import HOUR, Traffic
from flexserve.stats import percentile

HEADROOMS = (0.2, 0.4, 0.6, 0.8, 0.95)


@dataclass(frozen=True)
class Slo:
    """Default's latency goal: p99 TTFT and TPOT, seconds (None: no goal)."""

    ttft_p99: float | None = None
    tpot_p99: float | None = None

    def holds(self, outcome: Outcome) -> bool:
        ttft = percentile(outcome.default_ttft, 99)
        tpot = percentile(outcome.default_tpot, 99)
        return ((self.ttft_p99 is None or ttft is None or ttft <= self.ttft_p99)
                and (self.tpot_p99 is None or tpot is None or tpot <= self.tpot_p99))


@dataclass
class Level:
    """One simulated load level: the outcome at the setting that held the SLO
    (or, if none did, at the last tried), and that setting."""

    rate: float  # default requests/s per replica
    outcome: Outcome
    headroom: float
    within_slo: bool
    tried: int  # windows simulated for it


@dataclass
class Hour:
    hour: int
    rate: float  # default requests/s for the fleet
    within_slo: bool
    headroom: float
    # Per second, for the fleet: tokens by tier.
    output_tps: dict[str, float] = field(default_factory=dict)
    prompt_tps: dict[str, float] = field(default_factory=dict)
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    tpot_p50: float | None = None
    tpot_p99: float | None = None
    busy_ratio: float = 0.0

    @property
    def flex_tokens(self) -> float:
        """Flex output tokens sellable in the hour (none if the SLO is missed)."""
        return self.output_tps.get("flex", 0.0) * HOUR if self.within_slo else 0.0


@dataclass
class DayPlan:
    replicas: int
    window: Window
    slo: Slo
    traffic: Traffic
    levels: list[Level]
    hours: list[Hour]
    wall_seconds: float

    @property
    def within_slo(self) -> bool:
        return all(h.within_slo for h in self.hours)

    @property
    def flex_tokens_per_day(self) -> float:
        return sum(h.flex_tokens for h in self.hours)

    def tokens_per_day(self, tier: str, kind: str = "output") -> float:
        """Tokens of ``tier`` served in the day (flex: only in hours within the SLO)."""
        total = 0.0
        for h in self.hours:
            if tier == "flex" and not h.within_slo:
                continue
            total += (h.output_tps if kind == "output" else h.prompt_tps).get(tier, 0.0) * HOUR
        return total


def plan_day(traffic: Traffic, replicas: int, window: Window, slo: Slo, levels: int = 6) -> DayPlan:
    """Plan the day of ``traffic`` on ``replicas`` replicas like ``window``'s."""
    if replicas < 1:
        raise ValueError("a fleet has at least one replica")
    started = time.perf_counter()
    window = dataclasses.replace(window, default_lengths=traffic.lengths)
    per_replica = [rate / replicas for rate in traffic.hourly_rate]
    points = _level_rates(per_replica, levels)
    simulated = [_level(window.with_rate(rate), slo) for rate in points]
    hours = [_hour(h, rate * replicas, replicas, _interpolate(simulated, rate), slo)
             for h, rate in enumerate(per_replica)]
    return DayPlan(replicas, window, slo, traffic, simulated, hours, time.perf_counter() - started)


def _level_rates(rates: list[float], levels: int) -> list[float]:
    low, high = min(rates), max(rates)
    if high - low < 1e-9 or levels < 2:
        return [high]
    return [low + (high - low) * i / (levels - 1) for i in range(levels)]


def _level(window: Window, slo: Slo) -> Level:
    start = window.scheduler.flex_headroom
    ladder = [start] + [h for h in HEADROOMS if h > start]
    outcome = None
    for tried, headroom in enumerate(ladder, 1):
        config = dataclasses.replace(window.scheduler, flex_headroom=headroom)
        outcome = simulate(dataclasses.replace(window, scheduler=config))
        if slo.holds(outcome):
            return Level(window.default_rate, outcome, headroom, True, tried)
    assert outcome is not None
    return Level(window.default_rate, outcome, ladder[-1], False, len(ladder))


@dataclass
class _Point:
    """A level's figures, or a mix of two levels' (per replica, per second)."""

    within_slo: bool
    headroom: float
    output_tps: dict[str, float]
    prompt_tps: dict[str, float]
    ttft: tuple[float | None, float | None]
    tpot: tuple[float | None, float | None]
    busy: float


def _point(level: Level) -> _Point:
    o = level.outcome
    return _Point(
        level.within_slo, level.headroom,
        {t: o.per_second(o.output_tokens, t) for t in o.output_tokens},
        {t: o.per_second(o.prompt_tokens, t) for t in o.prompt_tokens},
        (percentile(o.default_ttft, 50), percentile(o.default_ttft, 99)),
        (percentile(o.default_tpot, 50), percentile(o.default_tpot, 99)),
        o.busy_ratio,
    )


def _interpolate(levels: list[Level], rate: float) -> _Point:
    """The figures at ``rate``: the straight line between the two levels around it."""
    if len(levels) == 1 or rate <= levels[0].rate:
        return _point(levels[0])
    for below, above in zip(levels, levels[1:], strict=False):
        if rate <= above.rate:
            share = (rate - below.rate) / (above.rate - below.rate)
            a, b = _point(below), _point(above)

            def mix(x: float | None, y: float | None) -> float | None:
                return None if x is None or y is None else x + (y - x) * share

            def mix_map(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
                return {t: x.get(t, 0.0) + (y.get(t, 0.0) - x.get(t, 0.0)) * share for t in {*x, *y}}

            return _Point(
                a.within_slo and b.within_slo, max(a.headroom, b.headroom),
                mix_map(a.output_tps, b.output_tps), mix_map(a.prompt_tps, b.prompt_tps),
                (mix(a.ttft[0], b.ttft[0]), mix(a.ttft[1], b.ttft[1])),
                (mix(a.tpot[0], b.tpot[0]), mix(a.tpot[1], b.tpot[1])),
                a.busy + (b.busy - a.busy) * share,
            )
    return _point(levels[-1])


def _hour(hour: int, rate: float, replicas: int, point: _Point, slo: Slo) -> Hour:
    return Hour(
        hour, rate, point.within_slo, point.headroom,
        {t: v * replicas for t, v in point.output_tps.items()},
        {t: v * replicas for t, v in point.prompt_tps.items()},
        point.ttft[0], point.ttft[1], point.tpot[0], point.tpot[1], point.busy,
    )


def size_fleet(traffic: Traffic, window: Window, slo: Slo, target: float, levels: int = 6,
               max_replicas: int = 64, *, measure: Callable[[DayPlan], float] | None = None,
               ) -> tuple[DayPlan | None, list[DayPlan]]:
    """The smallest fleet within the SLO all day whose ``measure`` (by default
    the flex output tokens it sells a day; the flex revenue, say) reaches
    ``target`` (None if ``max_replicas`` do not), and every plan tried. Both
    grow with the fleet, so the search doubles then bisects."""
    tried: dict[int, DayPlan] = {}
    measure = measure or (lambda day: day.flex_tokens_per_day)

    def plan(n: int) -> DayPlan:
        if n not in tried:
            tried[n] = plan_day(traffic, n, window, slo, levels)
        return tried[n]

    def enough(n: int) -> bool:
        result = plan(n)
        return result.within_slo and measure(result) >= target

    low, high = 0, 1
    while not enough(high):
        low = high
        if high >= max_replicas:
            return None, [tried[n] for n in sorted(tried)]
        high = min(high * 2, max_replicas)
    while high - low > 1:
        middle = (low + high) // 2
        if enough(middle):
            high = middle
        else:
            low = middle
    return plan(high), [tried[n] for n in sorted(tried)]


def day_summary(plan: DayPlan) -> dict[str, Any]:
    return {
        "replicas": plan.replicas,
        "within_slo_all_day": plan.within_slo,
        "flex_output_tokens_per_day": round(plan.flex_tokens_per_day),
        "default_output_tokens_per_day": round(plan.tokens_per_day("default")),
    }
