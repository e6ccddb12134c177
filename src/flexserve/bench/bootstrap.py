"""Bootstrap confidence intervals for ratios of percentiles.

A p99 of a few hundred latencies rests on its few largest values, so a ratio
of two such p99s (scenario B's default TTFT over A's) moves by tenths from run
to run. ``ratio_interval`` says how far: it resamples each scenario's
per-request values with replacement, takes the ratio of the two percentiles
each time, and returns the 2.5th and 97.5th percentiles of those ratios (a
95 % percentile-bootstrap interval). Seeded, so a report reproduces.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from flexserve import stats

__all__ = ["ratio_interval"]


def ratio_interval(num: Sequence[float], den: Sequence[float], q: float = 99.0, *,
                   resamples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float] | None:
    """A ``level`` bootstrap interval of percentile(num, q) / percentile(den, q);
    None when either side has fewer than two values."""
    if len(num) < 2 or len(den) < 2:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        top = stats.ranked(sorted(rng.choices(num, k=len(num))), q)
        bottom = stats.ranked(sorted(rng.choices(den, k=len(den))), q)
        if bottom > 0:
            ratios.append(top / bottom)
    if not ratios:
        return None
    ratios.sort()
    tail = (1 - level) / 2 * 100
    return stats.ranked(ratios, tail), stats.ranked(ratios, 100 - tail)
