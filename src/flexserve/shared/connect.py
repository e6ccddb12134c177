"""Connecting a gateway to the Redis its deployment shares (setting ``redis``).

``redis`` is an optional dependency (``flexserve[redis]``): this module is
imported only when the setting is there.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from flexserve.config import Settings
from flexserve.scheduler.placement import own_counts
from flexserve.scheduler.scheduler import Scheduler
from flexserve.shared.budgets import RedisBudgets
from flexserve.shared.capacity import SharedSlots
from flexserve.shared.changes import ChangeListener
from flexserve.shared.prefills import SharedPrefills
from flexserve.shared.presence import Presence
from flexserve.shared.ratelimit import RedisRateLimits


class SharedStateError(Exception):
    """Redis cannot be used: unreachable, or refusing the gateway."""


def shown_redis_url(url: str) -> str:
    """``url`` without its password: for messages that may reach a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# Connections a gateway keeps to Redis at most. A burst of requests queues
# for one (each holds it for one round trip, well under a millisecond on a
# LAN) rather than opening a connection each: hundreds of handshakes at once,
# which a loaded Redis answered only after the 5 s a call waits.
MAX_CONNECTIONS = 64


def client(url: str, *, timeout: float = 5.0) -> Redis:
    """A client for ``url`` on a pool of at most ``MAX_CONNECTIONS``: a call
    waits up to ``timeout`` seconds for a free connection, to connect, and
    for Redis's answer."""
    pool = BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=timeout,
        socket_connect_timeout=timeout, socket_timeout=timeout, health_check_interval=10,
    )
    return Redis.from_pool(pool)


async def connect(url: str) -> Redis:
    """A client for ``url``, once Redis answers; else ``SharedStateError``."""
    redis = client(url)
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        await redis.aclose()
        raise SharedStateError(f"Redis at {shown_redis_url(url)} cannot be reached: {exc}") from exc
    return redis


@dataclass(frozen=True)
class SharedState:
    """What a gateway keeps in the shared Redis."""

    presence: Presence
    budgets: RedisBudgets
    limits: RedisRateLimits


async def open_shared(settings: Settings, stack: AsyncExitStack, scheduler: Scheduler) -> SharedState:
    """This gateway's lease in the shared Redis; its leases on the engines'
    slots, kept up to date for ``scheduler``, and the prompts it has awaiting
    prefill on them, told to the others; the budgets and rate limits kept
    there. All closed with ``stack`` (the leases given back)."""
    redis = await connect(settings.redis)
    stack.push_async_callback(redis.aclose)
    presence = Presence(redis, prefix=settings.redis_prefix, ttl=settings.redis_lease_ttl)
    await presence.start()
    stack.push_async_callback(presence.close)
    slots = SharedSlots(presence, scheduler.slot_demand, scheduler.lease,
                        interval=settings.redis_slots_interval)
    await slots.start()
    stack.push_async_callback(slots.close)
    if settings.redis_share_prefills:
        prefills = SharedPrefills(presence, scheduler.replicas(), own_counts)
        await prefills.start()
        stack.push_async_callback(prefills.close)
        scheduler.on_prefill_change = prefills.changed
        stack.callback(setattr, scheduler, "on_prefill_change", None)
    return SharedState(presence, RedisBudgets(presence), RedisRateLimits(presence))


async def listen_for_changes(
    shared: SharedState, stack: AsyncExitStack, on_change: Callable[[], None]
) -> None:
    """Call ``on_change`` whenever the CLI announces a change (``changes``)."""
    listener = ChangeListener(shared.presence.redis, shared.presence.prefix, on_change)
    await listener.start()
    stack.push_async_callback(listener.close)
