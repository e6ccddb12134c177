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
- it shares the capacity among organizations, max-min fair by what each
  asks for on all gateways together (its sequences in flight and waiting),
  splits each organization's part over the gateways it asks on, max-min
  fair by what it asks on each, and gives each gateway its parts; the rest
  is spread evenly, so that a burst on an idle gateway starts at once;
- it grows the caller's lease toward its share only as far as the others
  leave free, and shrinks it no lower than what the caller has in flight;
  the caller admits only up to its share (its *grant*), so a lease above
  its share shrinks as its runs end, rather than being refilled by the
  caller's own queue before the next renewal (which kept slots with the
  gateway that first held them for as long as it had work waiting);
- it gives the caller a *flex room* (``holder:flex``): in flight below it,
  flex may start there. The rooms are parts of the replica's capacity less
  the headroom kept for default; each is its grant's part of it (so that
  each gateway keeps its part of the headroom for the default requests it
  receives), grows only into what the others' rooms leave and shrinks no
  lower than the flex the caller runs.

So the leases on a replica never sum past its capacity, the flex on it never
past its flex room (as one gateway would hold it: a headroom per lease would
keep one per gateway), and a gateway whose share fell gives slots back as its
runs end. (A room counts the gateway's own runs only, so flex also waits
while the engine itself reports its capacity less the headroom in use,
each gateway starting only its part of the room a reading shows:
``policy.shared_flex_starts``.) An organization that asks on
other gateways too has its turns in this gateway's flex and batch queues
weighed by its part here against the others' (``FairQueue.weights``), so it
gets its fair part of the engine, not a part on each; organizations that
ask here only keep equal turns (one gateway's fairness, unchanged). A replica's URL names it in
Redis: gateways must list the same replicas under the same URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from flexserve.scheduler.replicas import SlotAsk, SlotLease
from flexserve.shared.presence import Presence
from flexserve.shared.tasks import stop

log = logging.getLogger(__name__)

# Lua: lease. KEYS: the gateways set, the replica's leases. ARGV: prefix,
# holder, capacity, flex capacity, in use, flex in use, then organization,
# want pairs. Returns what the caller may admit up to (its grant) and its
# flex room's grant, then for each of its organizations: the organization,
# its part of the lease, and "1" if it asks for slots on other gateways too.
_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gateways, slots = KEYS[1], KEYS[2]
local me, capacity, flex_capacity = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local in_use, flex_in_use = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', gateways, '-inf', now)
local mine = {}
for i = 7, #ARGV, 2 do mine[ARGV[i]] = tonumber(ARGV[i + 1]) end
redis.call('HSET', slots, me .. ':want', cjson.encode(mine))
local leases, wants, rooms, holders = {}, {}, {}, {}
local stored = redis.call('HGETALL', slots)
for i = 1, #stored, 2 do
  local field, value = stored[i], stored[i + 1]
  local holder, kind = string.match(field, '^(.*):(%a+)$')
  local name = holder or field
  if name ~= me and not redis.call('ZSCORE', gateways, name) then
    redis.call('HDEL', slots, field)
  elseif kind == 'want' then
    wants[holder] = holder == me and mine or cjson.decode(value)
    table.insert(holders, holder)
  elseif kind == 'flex' then
    rooms[holder] = tonumber(value)
  else
    leases[field] = tonumber(value)
  end
end
-- Each organization's part of the capacity: max-min fair over what it
-- asks for on all gateways together.
local demand, orgs = {}, {}
for _, holder in ipairs(holders) do
  for org, want in pairs(wants[holder]) do
    if not demand[org] then demand[org] = 0; table.insert(orgs, org) end
    demand[org] = demand[org] + want
  end
end
table.sort(orgs, function(a, b)
  if demand[a] == demand[b] then return a < b end
  return demand[a] < demand[b]
end)
local left, part = capacity, {}
for i, org in ipairs(orgs) do
  part[org] = math.min(demand[org], left / (#orgs - i + 1))
  left = left - part[org]
end
-- Each organization's part split over the gateways it asks on, max-min
-- fair by what it asks on each (not in proportion: gateways that all ask
-- for more than their part get equal parts, which a backlog's ups and
-- downs do not move from one gateway to another).
table.sort(holders)
local split = {}
for _, holder in ipairs(holders) do split[holder] = {} end
for _, org in ipairs(orgs) do
  local askers = {}
  for _, holder in ipairs(holders) do
    local want = wants[holder][org]
    if want and want > 0 then table.insert(askers, holder) end
  end
  table.sort(askers, function(a, b)
    if wants[a][org] == wants[b][org] then return a < b end
    return wants[a][org] < wants[b][org]
  end)
  local rest = part[org]
  for i, holder in ipairs(askers) do
    local given = math.min(wants[holder][org], rest / (#askers - i + 1))
    split[holder][org] = given
    rest = rest - given
  end
end
-- A gateway's share: its organizations' parts on it; whole slots, the
-- rest spread evenly for bursts.
local share, spare = {}, capacity
for _, holder in ipairs(holders) do
  local sum = 0
  for _, given in pairs(split[holder]) do sum = sum + given end
  share[holder] = math.floor(sum + 1e-9)
  spare = spare - share[holder]
end
local each, extra = math.floor(spare / #holders), spare % #holders
for i, holder in ipairs(holders) do
  share[holder] = share[holder] + each
  if i <= extra then share[holder] = share[holder] + 1 end
end
local others, others_flex = 0, 0
for holder, lease in pairs(leases) do
  if holder ~= me then others = others + lease end
end
for holder, room in pairs(rooms) do
  if holder ~= me then others_flex = others_flex + room end
end
-- What the caller may admit up to (its grant), and what it holds: no less
-- than what it runs, so that a lease shrinks as its runs end, never under them.
local grant = math.min(share[me], capacity - others)
local lease = math.max(in_use, grant)
-- Flex room: the grant's own part of the flex capacity, so that each
-- gateway keeps its part of the headroom for its default arrivals.
local fair = math.floor(flex_capacity * grant / capacity + 0.5)
local room_grant = math.max(0, math.min(grant, fair, flex_capacity - others_flex))
local room = math.max(flex_in_use, room_grant)
redis.call('HSET', slots, me, lease, me .. ':flex', room)
redis.call('PEXPIRE', slots, 86400000)
local answer = {grant, room_grant}
for org, want in pairs(mine) do
  if want > 0 then
    table.insert(answer, org)
    table.insert(answer, string.format('%.6f', split[me][org]))
    table.insert(answer, demand[org] > want and '1' or '0')
  end
end
return answer
"""


class SharedSlots:
    """Keeps this gateway's leases on every replica's slots up to date.

    ``replicas`` gives, each round, what this gateway asks of each replica
    (``SlotAsk``); ``grant`` is told each replica's name and lease."""

    def __init__(
        self, presence: Presence,
        replicas: Callable[[], list[SlotAsk]],
        grant: Callable[[str, SlotLease], None],
        *, interval: float = 0.2,
    ) -> None:
        self._presence = presence
        self._replicas = replicas
        self._grant = grant
        self.interval = interval
        self._lease = presence.redis.register_script(_LEASE)
        # What each replica's lease was last granted as.
        self._granted: dict[str, SlotLease] = {}
        self._task: asyncio.Task[None] | None = None

    def _key(self, replica: str) -> str:
        return f"{self._presence.prefix}:slots:{replica}"

    async def start(self) -> None:
        await self.renew()
        self._task = asyncio.create_task(self._renew_forever(), name="redis-slots")

    async def renew(self) -> None:
        """Ask for this gateway's share of every replica now. (Asking holds
        admission to what runs until the answer: ``Scheduler.slot_demand``.)"""
        replicas = self._replicas()
        holder = self._presence.holder
        try:
            async with self._presence.redis.pipeline(transaction=False) as pipe:
                for ask in replicas:
                    args: list[str | int] = [self._presence.prefix, holder, ask.capacity,
                                             ask.flex_capacity, ask.in_use, ask.flex_in_use]
                    for org, want in ask.wants.items():
                        args += [org, want]
                    await self._lease(keys=[self._presence.gateways_key, self._key(ask.replica)],
                                      args=args, client=pipe)
                answers = await pipe.execute()
        except BaseException:
            # No answer: the leases granted last stay in force (a call that
            # timed out after Redis ran it may have shrunk one meanwhile: over
            # by that much until the next renewal answers).
            for name, granted in self._granted.items():
                self._grant(name, granted)
            raise
        for ask, answer in zip(replicas, answers, strict=True):
            orgs = range(2, len(answer), 3)
            lease = SlotLease(
                slots=int(answer[0]), flex_room=int(answer[1]),
                shares={_text(answer[i]): float(answer[i + 1]) for i in orgs},
                spread={_text(answer[i]) for i in orgs if _text(answer[i + 2]) == "1"})
            self._granted[ask.replica] = lease
            self._grant(ask.replica, lease)

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
        await stop(task)
        with contextlib.suppress(RedisError):
            async with self._presence.redis.pipeline(transaction=False) as pipe:
                for ask in self._replicas():
                    holder = self._presence.holder
                    await pipe.hdel(self._key(ask.replica), holder, f"{holder}:want",
                                    f"{holder}:flex")
                await pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
