"""The bootstrap intervals the tiers benchmark puts on its p99 ratios."""

from __future__ import annotations

import random

from flexserve.bench.bootstrap import ratio_interval
from flexserve.stats import percentile, ranked


def test_percentiles_interpolate_between_closest_ranks() -> None:
    """The one formula every report ranks with (``flexserve.stats``)."""
    assert ranked([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert ranked([0.0, 10.0], 99) == 9.9
    assert ranked([7.0], 99) == 7.0
    assert percentile([10.0, 0.0], 99) == 9.9  # unsorted: sorted first
    assert percentile([], 50) is None


def test_interval_brackets_the_true_ratio_and_narrows_with_more_requests() -> None:
    rng = random.Random(1)
    widths = []
    for n in (200, 2000):
        den = [rng.expovariate(1.0) for _ in range(n)]
        num = [2 * rng.expovariate(1.0) for _ in range(n)]
        interval = ratio_interval(num, den, 99, resamples=300)
        assert interval is not None
        low, high = interval
        assert low < 2.0 < high
        widths.append(high - low)
    assert widths[1] < widths[0]


def test_interval_is_seeded_and_needs_two_values_a_side() -> None:
    values = [float(i) for i in range(1, 101)]
    assert ratio_interval(values, values, resamples=50) == ratio_interval(values, values, resamples=50)
    assert ratio_interval([1.0], values) is None
