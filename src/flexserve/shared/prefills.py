"""Prompts awaiting prefill on each replica, told to every gateway that shares it.

Placement sends default work where the fewest prompt tokens wait to be
prefilled (``scheduler/placement.py``): a prompt that arrives behind others
waits out their prefill. A gateway knows the prompts it sent itself; in a
fleet of three it knows about a third of what waits on each engine, and in
the fleet benchmark a third of its default requests went where another
engine had less waiting (docs/benchmarks.md, "Tiers on a fleet").

With ``redis`` set, each gateway publishes on ``{prefix}:prefills`` its own
count for a replica (the prompt tokens of its runs there that have had no
output yet) whenever it changes, at most once per replica per turn of the
event loop, and again every ``_REPEAT`` seconds while it is not zero. Each
gateway keeps what the others last said and adds it to its own
(``Replica.others_unprefilled``); a count not heard again within ``_FRESH``
seconds is dropped, so that a gateway that died stops counting. Messages are
fire and forget: one lost, or Redis away, leaves a gateway knowing its own
part until the next, as it would without Redis.

The same message carries the default and priority sequences the gateway
runs on the replica, which packed placement counts (``default_placement =
"pack"``): ``Replica.others_default_runs``.

A message is ``gateway replica tokens defaults``: the gateway's id, the
replica's name (its URL, as every gateway lists it) and the two counts (a
gateway of an earlier version sends the first alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from flexserve.scheduler.replicas import Replica
from flexserve.shared.presence import Presence
from flexserve.shared.tasks import stop

log = logging.getLogger(__name__)

# A gateway's prompt tokens awaiting prefill and default runs on one replica.
Counts = tuple[int, int]
NONE: Counts = (0, 0)

# Seconds between repeats of a count that is not zero, and how long another
# gateway's count is kept without being heard again.
_REPEAT = 1.0
_FRESH = 3.0


def channel(prefix: str) -> str:
    return f"{prefix}:prefills"


class SharedPrefills:
    """Publishes this gateway's prompts awaiting prefill and default runs on
    each shared replica, and keeps each replica's ``others_unprefilled`` and
    ``others_default_runs`` from what the other gateways publish. ``own``
    counts this gateway's for a replica."""

    def __init__(self, presence: Presence, replicas: list[Replica],
                 own: Callable[[Replica], Counts]) -> None:
        self._presence = presence
        self._channel = channel(presence.prefix)
        self._replicas = {replica.name: replica for replica in replicas if replica.engine.shared}
        self._own = own
        # What this gateway last published for each replica.
        self._published: dict[str, Counts] = {}
        # Replicas whose count may have changed since the last publish.
        self._dirty: set[str] = set()
        self._flushing = False
        # replica → holder → (counts, time.monotonic() heard)
        self._heard: dict[str, dict[str, tuple[Counts, float]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._publishing: set[asyncio.Task[None]] = set()
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen_forever(), name="redis-prefills"),
                       asyncio.create_task(self._repeat_forever(), name="redis-prefills-repeat")]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 5)

    def changed(self, replica: Replica) -> None:
        """This gateway's prompts awaiting prefill on ``replica`` may have changed."""
        if replica.name not in self._replicas:
            return
        self._dirty.add(replica.name)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        names, self._dirty = self._dirty, set()
        counts: dict[str, Counts] = {}
        for name in names:
            own = self._own(self._replicas[name])
            if own != self._published.get(name, NONE):
                counts[name] = own
        if counts:
            self._published.update(counts)
            task = asyncio.create_task(self._publish(counts))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    async def _publish(self, counts: dict[str, Counts]) -> None:
        holder = self._presence.gateway_id
        try:
            async with self._presence.redis.pipeline(transaction=False) as pipe:
                for name, (tokens, defaults) in counts.items():
                    pipe.publish(self._channel, f"{holder} {name} {tokens} {defaults}")
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("publishing prompts awaiting prefill failed: %s", exc)

    async def _repeat_forever(self) -> None:
        while True:
            await asyncio.sleep(_REPEAT)
            self._expire(time.monotonic())
            counts = {name: own for name, own in self._published.items() if own != NONE}
            if counts:
                await self._publish(counts)

    async def _listen_forever(self) -> None:
        holder = self._presence.gateway_id
        while True:
            try:
                async with self._presence.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    self._subscribed.set()
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            self._hear(message["data"], holder)
            except (RedisError, OSError) as exc:
                log.warning("listening for prompts awaiting prefill on Redis failed (%s); "
                            "retrying in 1 s", exc)
                await asyncio.sleep(1.0)

    def _hear(self, data: bytes | str, me: str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        try:
            counts = parse(text)
        except ValueError:
            log.warning("ignored a malformed message on %s: %r", self._channel, text[:200])
            return
        holder, name, own = counts
        replica = self._replicas.get(name)
        if holder == me or replica is None:
            return
        heard = self._heard.setdefault(name, {})
        heard[holder] = (own, time.monotonic())
        _sum_into(replica, heard)

    def _expire(self, now: float) -> None:
        for name, heard in self._heard.items():
            stale = [holder for holder, (_, at) in heard.items() if now - at > _FRESH]
            for holder in stale:
                del heard[holder]
            if stale:
                _sum_into(self._replicas[name], heard)

    async def close(self) -> None:
        """Stop, telling the others that this gateway has nothing awaiting
        prefill any more (a gateway that dies is dropped within ``_FRESH``)."""
        tasks, self._tasks = [*self._tasks, *self._publishing], []
        for task in tasks:
            await stop(task)
        counts = {name: NONE for name, own in self._published.items() if own != NONE}
        if counts:
            await self._publish(counts)


def parse(text: str) -> tuple[str, str, Counts]:
    """A message's gateway, replica and counts (ValueError if malformed)."""
    parts = text.split(" ")
    if len(parts) == 3:
        holder, name, tokens = parts
        return holder, name, (int(tokens), 0)
    if len(parts) == 4:
        holder, name, tokens, defaults = parts
        return holder, name, (int(tokens), int(defaults))
    raise ValueError(text)


def _sum_into(replica: Replica, heard: dict[str, tuple[Counts, float]]) -> None:
    replica.others_unprefilled = sum(own[0] for own, _ in heard.values())
    replica.others_default_runs = sum(own[1] for own, _ in heard.values())
