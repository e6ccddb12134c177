"""Writes to Redis a request must not wait for (settling a budget hold,
correcting a rate-limit take): queued in memory and sent in the background,
a batch per round trip, retried with backoff while Redis is away.

A batch that failed may have been carried out all the same (its commands
were in Redis's socket when the connection gave up): ``send`` is told so
(``again``) when it sends the batch the next time, and must not apply an
effect twice where that matters.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from redis.exceptions import RedisError

from flexserve.shared.tasks import stop

log = logging.getLogger(__name__)

T = TypeVar("T")

# Items sent per round trip.
BATCH = 256


class Outbox(Generic[T]):
    """Items for ``send(batch, again)``, sent in order by a background task."""

    def __init__(self, what: str, send: Callable[[list[T], bool], Awaitable[None]]) -> None:
        self._what = what  # for the log: "budget settlements"
        self._send = send
        self._items: collections.deque[T] = collections.deque()
        # The first this many items were in a batch that failed.
        self._uncertain = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        self._items.append(item)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"redis-outbox ({self._what})")

    async def flush(self) -> None:
        """Send one batch now (or raise the RedisError that stopped it)."""
        batch = [self._items[i] for i in range(min(len(self._items), BATCH))]
        again = self._uncertain > 0
        try:
            await self._send(batch, again)
        except RedisError:
            self._uncertain = max(self._uncertain, len(batch))
            raise
        for _ in batch:
            self._items.popleft()
        self._uncertain = max(0, self._uncertain - len(batch))

    async def _run(self) -> None:
        pause = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items:
                try:
                    await self.flush()
                    pause = 0.05
                except RedisError as exc:
                    log.warning("sending %d %s to Redis failed (%s); retrying in %.1f s",
                                len(self._items), self._what, exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 2.0)

    async def close(self, grace: float = 5.0) -> int:
        """Stop the background task and send what is queued, for up to
        ``grace`` seconds; the number of items left unsent."""
        task, self._task = self._task, None
        await stop(task)
        deadline = time.monotonic() + grace
        while self._items and (left := deadline - time.monotonic()) > 0:
            try:
                # Bounded: a connection left waiting for a reply that never
                # comes (its last command cancelled midway) would hold the
                # close for ever.
                await asyncio.wait_for(self.flush(), left)
            except RedisError:
                await asyncio.sleep(0.2)
            except TimeoutError:
                break
        return len(self._items)
