"""Engine slots shared by every gateway in front of the same replicas.

One gateway admits to a replica as many sequences as the replica runs at
once (its capacity). Two gateways in front of it would each admit that many.
With ``redis`` set, each gateway holds a *lease* on part of each replica's
capacity and admits only within it: the scheduler sees the lease as the
replica's capacity (``Scheduler.lease``), so all its rules — flex only on
spare capacity, a headroom kept for default, priority's share — apply
within it unchanged, and the hot path makes no round trip.

Leases live in ``{prefix}:slots:{replica}`` (a hash: holder → slots, and
holder ``:want`` → the slots it asks for) and are changed by one Lua script,
which every gateway runs for each replica every ``interval`` seconds:

- it drops the leases of gateways whose lease in ``presence`` lapsed (a
  gateway that dies gives its slots back within ``redis_lease_ttl``);
- it shares the capacity among live gateways by what each asks for (its
  sequences in flight and waiting), max-min fair, the rest spread evenly so
  that a burst on an idle gateway can start at once;
- it grows the caller's lease toward its share only as far as the others
  leave free, and shrinks it no lower than what the caller has in flight.

So the leases on a replica never sum past its capacity, and a gateway whose
share fell gives slots back as its runs end. A replica's URL names it in
Redis: gateways must list the same replicas under the same URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from flexserve.shared.presence import Presence

log = logging.getLogger(__name__)

# Lua: lease. KEYS: the gateways set, the replica's leases. ARGV: prefix,
# holder, capacity, want, in use. Returns the caller's lease now.
_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gateways, slots = KEYS[1], KEYS[2]
local me, capacity = ARGV[2], tonumber(ARGV[3])
local want, in_use = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', gateways, '-inf', now)
local leases, wants, holders = {}, {}, {}
local stored = redis.call('HGETALL', slots)
for i = 1, #stored, 2 do
  local field, value = stored[i], tonumber(stored[i + 1])
  local holder = string.match(field, '^(.*):want$')
  local name = holder or field
  if name ~= me and not redis.call('ZSCORE', gateways, name) then
    redis.call('HDEL', slots, field)
  elseif holder then
    wants[holder] = value
  else
    leases[field] = value
  end
end
wants[me] = want
redis.call('HSET', slots, me .. ':want', want)
for holder in pairs(wants) do table.insert(holders, holder) end
table.sort(holders, function(a, b)
  if wants[a] == wants[b] then return a < b end
  return wants[a] < wants[b]
end)
local left, share = capacity, {}
for i, holder in ipairs(holders) do
  local give = math.min(wants[holder], math.floor(left / (#holders - i + 1)))
  share[holder] = give
  left = left - give
end
table.sort(holders)
local each, extra = math.floor(left / #holders), left % #holders
for i, holder in ipairs(holders) do
  share[holder] = share[holder] + each
  if i <= extra then share[holder] = share[holder] + 1 end
end
local others = 0
for holder, lease in pairs(leases) do
  if holder ~= me then others = others + lease end
end
local mine = math.max(in_use, math.min(share[me], capacity - others))
redis.call('HSET', slots, me, mine)
redis.call('PEXPIRE', slots, 86400000)
return mine
"""


class SharedSlots:
    """Keeps this gateway's leases on every replica's slots up to date.

    ``replicas`` gives, each round, each replica's name, its full capacity,
    and the slots this gateway wants there and has in flight; ``grant`` is
    told each replica's lease."""

    def __init__(
        self, presence: Presence,
        replicas: Callable[[], list[tuple[str, int, int, int]]],
        grant: Callable[[str, int], None],
        *, interval: float = 0.2,
    ) -> None:
        self._presence = presence
        self._replicas = replicas
        self._grant = grant
        self.interval = interval
        self._lease = presence.redis.register_script(_LEASE)
        self._task: asyncio.Task[None] | None = None

    def _key(self, replica: str) -> str:
        return f"{self._presence.prefix}:slots:{replica}"

    async def start(self) -> None:
        await self.renew()
        self._task = asyncio.create_task(self._renew_forever(), name="redis-slots")

    async def renew(self) -> None:
        """Ask for this gateway's share of every replica now."""
        replicas = self._replicas()
        holder = self._presence.holder
        async with self._presence.redis.pipeline(transaction=False) as pipe:
            for name, capacity, want, in_use in replicas:
                await self._lease(
                    keys=[self._presence.gateways_key, self._key(name)],
                    args=[self._presence.prefix, holder, capacity, want, in_use], client=pipe,
                )
            leases = await pipe.execute()
        for (name, *_), lease in zip(replicas, leases, strict=True):
            self._grant(name, int(lease))

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.renew()
            except RedisError as exc:
                # The leases held stay in force: others cannot take them
                # while this gateway's lease on its presence lasts.
                log.warning("renewing engine-slot leases in Redis failed: %s", exc)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(RedisError):
            async with self._presence.redis.pipeline(transaction=False) as pipe:
                for name, *_ in self._replicas():
                    await pipe.hdel(self._key(name), self._presence.holder,
                                    f"{self._presence.holder}:want")
                await pipe.execute()
