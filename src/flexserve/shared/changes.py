"""Changes the operator made, told to every gateway at once.

Gateways reload prices, gates, budgets and limits every
``policy_refresh_interval`` seconds and keep a key's answer for 5 seconds:
that bounds how late a change reaches them. With ``redis`` set, the CLI
also publishes on ``{prefix}:changes`` after each command it ran against
the database, and every gateway that hears it forgets its cached keys and
reloads its policy at once (a revoked key is refused within milliseconds).
A message lost (Redis away, a gateway reconnecting) only falls back to the
bound above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from flexserve.shared.tasks import stop

log = logging.getLogger(__name__)


def channel(prefix: str) -> str:
    return f"{prefix}:changes"


async def announce(url: str, prefix: str) -> None:
    """Tell every gateway listening on the Redis at ``url`` that the
    database changed (raises RedisError or OSError when it cannot)."""
    redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        await redis.publish(channel(prefix), "changed")
    finally:
        await redis.aclose()


class ChangeListener:
    """Calls ``on_change`` for each announcement, reconnecting while Redis is away."""

    def __init__(self, redis: Redis, prefix: str, on_change: Callable[[], None]) -> None:
        self._redis = redis
        self._channel = channel(prefix)
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="redis-changes")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 5)

    async def _listen_forever(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    self._subscribed.set()
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            self._on_change()
            except (RedisError, OSError) as exc:
                log.warning("listening for changes on Redis failed (%s); retrying in 1 s", exc)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop(task)
