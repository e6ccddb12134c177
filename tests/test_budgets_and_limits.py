"""Budgets (reserve, settle) and rate limits (token buckets), without a network."""

from __future__ import annotations

import asyncio
import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexserve.billing.budget import (
    BudgetExceeded,
    LocalBudgets,
    Reservation,
    month_bounds,
    month_of,
    month_start,
)
from flexserve.billing.ratelimit import RateLimit, RateLimiter, go_duration
from flexserve.errors import RateLimitError
from flexserve.tiers import ServiceTier

ORG = "org:o"
PROJECT = "project:p"
JUNE = datetime.datetime(2025, 6, 30, 23, 59, tzinfo=datetime.UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_reserve_admits_while_under_the_budget_and_settle_swaps_hold_for_cost() -> None:
    budgets = LocalBudgets(Clock(JUNE))
    budgets.set_limits({ORG: 100})
    first = budgets.reserve_now([ORG, PROJECT], 60)
    second = budgets.reserve_now([ORG, PROJECT], 60)  # 60 < 100: admitted, may overspend
    with pytest.raises(BudgetExceeded) as refused:
        budgets.reserve_now([ORG, PROJECT], 1)  # 120 promised: nothing more
    assert (refused.value.scope, refused.value.limit, refused.value.committed) == (ORG, 100, 120)
    budgets.settle(first, 10)
    budgets.settle(first, 10)  # settled once only
    assert (budgets.spent(ORG), budgets.reserved(ORG), budgets.spent(PROJECT)) == (10, 60, 10)
    budgets.release(second)
    assert (budgets.spent(ORG), budgets.reserved(ORG)) == (10, 0)
    budgets.reserve_now([ORG], 0)  # 10 < 100


def test_a_new_month_starts_from_nothing() -> None:
    clock = Clock(JUNE)
    budgets = LocalBudgets(clock)
    budgets.set_limits({ORG: 100})
    budgets.load_spent(month_of(JUNE), {ORG: 100})
    with pytest.raises(BudgetExceeded):
        budgets.reserve_now([ORG], 1)
    late = LocalBudgets(clock)
    late.set_limits({ORG: 100})
    june_request = late.reserve_now([ORG], 50)
    clock.now += 120  # July
    late.settle(june_request, 50)  # June's cost: not July's spend
    assert late.spent(ORG) == 0 and late.reserved(ORG) == 0
    assert month_of(clock.now) == "2025-07"
    assert month_start(clock.now) == datetime.datetime(2025, 7, 1, tzinfo=datetime.UTC).timestamp()


def test_the_month_turns_at_its_first_second_and_follows_a_clock_set_back() -> None:
    july = datetime.datetime(2025, 7, 1, tzinfo=datetime.UTC).timestamp()
    clock = Clock(july - 0.001)
    budgets = LocalBudgets(clock)
    budgets.settle(budgets.reserve_now([ORG], 10), 10)
    assert budgets.spent(ORG) == 10  # still June
    clock.now = july
    assert budgets.spent(ORG) == 0  # July: the month is looked up again past its end
    assert budgets.reserve_now([ORG], 1).month == "2025-07"
    clock.now = july - 1  # the clock stepped back into June
    assert budgets.reserve_now([ORG], 1).month == "2025-06"
    december = datetime.datetime(2025, 12, 31, 23, 59, 59, tzinfo=datetime.UTC).timestamp()
    assert month_bounds(december) == (
        "2025-12",
        datetime.datetime(2025, 12, 1, tzinfo=datetime.UTC).timestamp(),
        datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC).timestamp(),
    )


@given(
    limit=st.integers(min_value=0, max_value=10_000),
    max_each=st.integers(min_value=1, max_value=1_000),
    plan=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=0, max_value=1_000)), max_size=200
    ),
)
def test_concurrent_requests_overspend_by_at_most_one_maximum(
    limit: int, max_each: int, plan: list[tuple[bool, int]]
) -> None:
    """Any interleaving of arrivals and completions (actual cost ≤ the hold)."""
    budgets = LocalBudgets(Clock(JUNE))
    budgets.set_limits({ORG: limit})
    in_flight: list[Reservation] = []
    for arrive, actual in plan:
        if arrive or not in_flight:
            try:
                in_flight.append(budgets.reserve_now([ORG], max_each))
            except BudgetExceeded:
                pass
        else:
            budgets.settle(in_flight.pop(actual % len(in_flight)), min(actual, max_each))
    for reservation in in_flight:
        budgets.settle(reservation, max_each)
    assert budgets.spent(ORG) <= limit + max_each


async def test_reserve_is_one_step_on_the_event_loop() -> None:
    budgets = LocalBudgets(Clock(JUNE))
    budgets.set_limits({ORG: 10})

    async def one() -> bool:
        try:
            await budgets.reserve([ORG], 3)
        except BudgetExceeded:
            return False
        return True

    admitted = await asyncio.gather(*(one() for _ in range(50)))
    assert sum(admitted) == 4  # 0, 3, 6, 9 are under 10; 12 is not


def test_requests_at_the_same_instant_never_pass_the_limit() -> None:
    clock = Clock(1000.0)
    limiter = RateLimiter(clock)
    limiter.set_limits({("o", ServiceTier.FLEX): RateLimit(requests_per_minute=3)})
    takes = []
    errors = []
    for _ in range(10):
        try:
            takes.append(limiter.take("o", ServiceTier.FLEX, 100))
        except RateLimitError as exc:
            errors.append(exc)
    assert len(takes) == 3 and len(errors) == 7
    assert [t.headers["x-ratelimit-remaining-requests"] for t in takes] == ["2", "1", "0"]
    assert takes[0].headers["x-ratelimit-limit-requests"] == "3"
    error = errors[0]
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.headers["Retry-After"] == "20"  # one request back every 20 s
    assert error.headers["x-ratelimit-reset-requests"] == "1m0s"
    # Other tiers and organizations are not limited.
    assert limiter.take("o", ServiceTier.DEFAULT, 100).headers == {}
    assert limiter.take("other", ServiceTier.FLEX, 100).headers == {}
    clock.now += 20
    limiter.take("o", ServiceTier.FLEX, 100)


def test_tokens_are_estimated_then_corrected() -> None:
    clock = Clock(0.0)
    limiter = RateLimiter(clock)
    limiter.set_limits({("o", ServiceTier.DEFAULT): RateLimit(tokens_per_minute=1000)})
    take = limiter.take("o", ServiceTier.DEFAULT, 800)
    with pytest.raises(RateLimitError) as refused:
        limiter.take("o", ServiceTier.DEFAULT, 300)
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "200"
    limiter.settle(take, 100)  # used 100 of the 800 estimated: 700 back
    limiter.settle(take, 100)  # once only
    assert (
        limiter.take("o", ServiceTier.DEFAULT, 850).headers["x-ratelimit-remaining-tokens"] == "50"
    )
    # Bigger than a minute's allowance: passes only on a full bucket.
    clock.now += 60
    limiter.take("o", ServiceTier.DEFAULT, 5000)
    with pytest.raises(RateLimitError):
        limiter.take("o", ServiceTier.DEFAULT, 1)


def test_changed_limits_keep_the_buckets_level() -> None:
    clock = Clock(0.0)
    limiter = RateLimiter(clock)
    key = ("o", ServiceTier.FLEX)
    limiter.set_limits({key: RateLimit(requests_per_minute=2)})
    limiter.take("o", ServiceTier.FLEX, 1)
    limiter.set_limits({key: RateLimit(requests_per_minute=2)})  # a refresh: same level
    limiter.take("o", ServiceTier.FLEX, 1)
    with pytest.raises(RateLimitError):
        limiter.take("o", ServiceTier.FLEX, 1)
    limiter.set_limits({})
    limiter.take("o", ServiceTier.FLEX, 1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.0171, "18ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3725, "1h2m5s")],
)
def test_go_durations(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
