"""The event loop's lag as ``/metrics`` reports it: a callback that blocks
the loop is seen as lag at least as long as the block, and a closed watch
observes nothing more."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from flexserve.observability.loop_lag import LoopLag


def _lag_samples(registry: CollectorRegistry) -> dict[str, float]:
    """Observations counted, and counted at or below each bucket's bound."""
    values = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                values["count"] = sample.value
            elif sample.name.endswith("_bucket"):
                values[sample.labels["le"]] = sample.value
    return values


async def _watch_while(block_seconds: float) -> dict[str, float]:
    registry = CollectorRegistry()
    lag = LoopLag(registry, interval=0.05)
    lag.start()
    await asyncio.sleep(0.12)  # a couple of free wake-ups first
    time.sleep(block_seconds)  # holds the loop: the watch's timer fires late
    await asyncio.sleep(0.12)
    await lag.close()
    return _lag_samples(registry)


def test_a_blocked_loop_is_seen_as_lag_as_long_as_the_block() -> None:
    values = asyncio.run(_watch_while(0.6))
    assert values["count"] >= 3
    # One observation at least 0.5 s late (the 0.6 s block less at most one
    # interval of the timer's own wait), so above the 0.5 s bucket.
    assert values["0.5"] < values["count"]


def test_a_closed_watch_observes_nothing_more() -> None:
    async def run() -> tuple[float, float]:
        registry = CollectorRegistry()
        lag = LoopLag(registry, interval=0.02)
        lag.start()
        await asyncio.sleep(0.1)
        await lag.close()
        seen = _lag_samples(registry)["count"]
        await asyncio.sleep(0.1)
        return seen, _lag_samples(registry)["count"]

    seen, later = asyncio.run(run())
    assert seen >= 1
    assert later == seen
