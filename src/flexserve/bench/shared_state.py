"""What sharing state through Redis costs a request: `flexserve bench shared-state`.

In one process, against the Redis at ``--redis``: a request's admission
holds (a budget reservation and a rate-limit take, each one Lua script, one
round trip) and their settlement (queued, sent in the background), timed one
request at a time (the latency a request sees) and with many at once (the
admissions a gateway can make per second), beside the same on the budgets
and limits kept in the process. Also one renewal of a gateway's leases on
every replica's slots (``SharedSlots``), which runs in the background.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

from flexserve.billing.budget import Budgets, LocalBudgets
from flexserve.billing.ratelimit import RateLimit, RateLimiter, RateLimits
from flexserve.scheduler.replicas import SlotAsk
from flexserve.tiers import ServiceTier

ORG, PROJECT = "org:org-bench", "project:proj-bench"


@dataclass(frozen=True)
class SharedStateConfig:
    redis: str
    requests: int = 2000
    concurrency: int = 64
    replicas: int = 8
    command: str = ""


async def _admit(budgets: Budgets, limits: RateLimits) -> None:
    take = await limits.acquire("org-bench", ServiceTier.DEFAULT, 300)
    hold = await budgets.reserve((ORG, PROJECT), 1_000)
    budgets.settle(hold, 600)
    limits.settle(take, 200)


async def _timed(budgets: Budgets, limits: RateLimits, config: SharedStateConfig) -> dict[str, float]:
    for _ in range(50):  # warm up: scripts loaded, connections open
        await _admit(budgets, limits)
    times = []
    for _ in range(config.requests):
        started = time.perf_counter()
        await _admit(budgets, limits)
        times.append((time.perf_counter() - started) * 1e6)
    times.sort()
    started = time.perf_counter()
    per_worker = config.requests // config.concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await _admit(budgets, limits)

    await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "p50_us": round(statistics.median(times), 1),
        "p99_us": round(times[int(len(times) * 0.99) - 1], 1),
        "admissions_per_s": round(per_worker * config.concurrency / elapsed),
    }


async def _measure(config: SharedStateConfig) -> dict[str, Any]:
    from redis.asyncio import Redis

    from flexserve.shared.budgets import RedisBudgets
    from flexserve.shared.capacity import SharedSlots
    from flexserve.shared.presence import Presence
    from flexserve.shared.ratelimit import RedisRateLimits

    unlimited = {ORG: 10**18}
    rates = {("org-bench", ServiceTier.DEFAULT): RateLimit(requests_per_minute=10**9,
                                                            tokens_per_minute=10**12)}
    local_budgets, local_limits = LocalBudgets(), RateLimiter()
    local_budgets.set_limits(unlimited)
    local_limits.set_limits(rates)
    results: dict[str, Any] = {"in process": await _timed(local_budgets, local_limits, config)}

    redis = Redis.from_url(config.redis)
    presence = Presence(redis, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    await presence.start()
    budgets, limits = RedisBudgets(presence), RedisRateLimits(presence)
    budgets.set_limits(unlimited)
    limits.set_limits(rates)
    await budgets.start()
    await limits.start()
    replicas = [SlotAsk(f"upstream:http://10.0.0.{i}:8000", 64, 51, 3, 1, {"org-a": 5, "org-b": 2})
                for i in range(config.replicas)]
    slots = SharedSlots(presence, lambda: replicas, lambda *_: None)
    try:
        results["redis"] = await _timed(budgets, limits, config)
        renewals = []
        for _ in range(200):
            started = time.perf_counter()
            await slots.renew()
            renewals.append((time.perf_counter() - started) * 1e6)
        results["slot_renewal_us"] = {"replicas": config.replicas,
                                      "p50_us": round(statistics.median(renewals), 1)}
    finally:
        await budgets.close()
        await limits.close()
        await slots.close()
        await presence.close()
        await redis.aclose()
    return results


def run_shared_state(config: SharedStateConfig) -> dict[str, Any]:
    return {"command": config.command, "requests": config.requests,
            "concurrency": config.concurrency, "results": asyncio.run(_measure(config))}


def format_report(report: dict[str, Any]) -> str:
    results = report["results"]
    lines = [
        f"`{report['command']}`",
        "",
        "| state kept | admission + settlement p50 (µs) | p99 (µs) | admissions/s "
        f"({report['concurrency']} at once) |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("in process", "redis"):
        row = results[name]
        lines.append(f"| {name} | {row['p50_us']} | {row['p99_us']} | {row['admissions_per_s']} |")
    renewal = results["slot_renewal_us"]
    lines += ["", f"One renewal of the slot leases on {renewal['replicas']} replicas "
                  f"(every 0.2 s, in the background): p50 {renewal['p50_us']} µs."]
    return "\n".join(lines)
