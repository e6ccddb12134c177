"""How late this gateway's event loop runs what is due: its own saturation.

Every request, stream relay, engine poll and lease renewal of a gateway runs
on one asyncio loop. Code that blocks the loop, or a CPU too busy to give the
process its turn, delays all of them at once: streams look silent, health
reads time out, `/metrics` is slow to answer. None of that shows in the
request metrics until it has done its harm; the loop's lag shows it as it
happens. A timer is set every ``interval`` seconds and the time it fired
late is observed in ``flexserve_event_loop_lag_seconds`` (Node's
`eventloop_lag` and asyncio's debug-mode "slow callback" warning measure the
same thing). The cost is one wake-up per interval.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram

from flexserve.shared.tasks import stop

INTERVAL_SECONDS = 0.5
# From a busy loop's milliseconds to the tens of seconds of a starved one.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class LoopLag:
    """Observes the event loop's lag while started (``start`` / ``close``)."""

    def __init__(self, registry: CollectorRegistry, interval: float = INTERVAL_SECONDS) -> None:
        self.interval = interval
        self.histogram = Histogram(
            "flexserve_event_loop_lag_seconds",
            f"How late the gateway's event loop ran a timer due every {interval:g} s: "
            "code blocking the loop, or a CPU too busy to run the process.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="loop-lag")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.histogram.observe(max(0.0, loop.time() - due))
