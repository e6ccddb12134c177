"""Percentiles, computed one way wherever FlexServe reports them (the
planner, the dashboard, every bench report and its bootstrap intervals):
linear between the closest ranks, None when there is nothing to rank."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values`` (sorted or not); None when empty."""
    if not values:
        return None
    return ranked(sorted(values), q)


def ranked(ordered: Sequence[float], q: float) -> float:
    """``percentile`` of values already sorted (and not empty): for callers
    that rank one sorted sample many times."""
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
