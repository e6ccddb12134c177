"""Monthly budgets shared by every gateway, in Redis.

The contract is ``flexserve.billing.budget.Budgets``'s: a scope admits a
request while its month's spend plus what requests in flight hold is under
its budget, so the month ends at most one request's maximum cost over it,
however many gateways and requests there are.

In Redis:

- ``{prefix}:spent:{month}``: a hash, scope → settled spend (pico-USD);
- ``{prefix}:held:{holder}``: a hash per live gateway: scope → what its
  requests in flight hold there, and ``r:{ref}`` → each hold's amount. It
  expires with the gateway's lease (``presence``), so a gateway that dies
  gives its holds back within the lease's TTL.

``reserve`` is one Lua script: it sums the month's spend and every live
gateway's holds for each scope with a budget, and takes the hold only if all
pass (a request none of whose scopes has a budget takes no hold and makes
no round trip; its cost is added all the same). ``settle`` never blocks: settlements are queued and sent in the
background (in one transaction per batch), retried while Redis is away;
until one is sent, its hold still counts, which errs on the side of the
budget.

A call that timed out may still have been carried out (its command was
already in Redis's socket when the connection gave up). So each hold has a
reference: a reserve that timed out is cancelled by reference (the hold if it
was taken, else a tombstone that voids it should it still arrive), and a
batch of settlements sent again after a timeout adds a cost only where its
hold was still there to give back. The one case counted short: a hold that
lapsed with its gateway's lease *and* whose settlement timed out; the ledger
has its cost, and the next gateway to start raises the spend to the ledger's.

Amounts are added with Redis's integer commands, so what is stored is exact.
The comparison with the budget is made in Lua's doubles, exact below 2**53
pico-USD (about $9,007); above that it may be off by a few pico-USD.

Budgets are the operator's settings, read from the database by every gateway
(``set_limits``) and passed to the script with each reservation.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from flexserve.billing.budget import BudgetExceeded, Budgets, Reservation, month_bounds
from flexserve.shared.errors import shared_state_unavailable
from flexserve.shared.outbox import Outbox
from flexserve.shared.presence import Presence

log = logging.getLogger(__name__)

# A month's spend is kept two months past its start, then expires.
_SPENT_TTL_SECONDS = 62 * 24 * 3600

# Lua: reserve. KEYS: the gateways set, the month's spend, the holder's holds.
# ARGV: prefix, holder, ref, amount, whole ("1"/"0"), then scope, limit (-1:
# none) pairs. Returns {"ok"}, {"gone"} (the holder's lease lapsed),
# {"cancelled"} (this ref was cancelled before it arrived), or
# {"exceeded", scope, committed}.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gateways, spent, held = KEYS[1], KEYS[2], KEYS[3]
local prefix, holder, ref, amount, whole = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1'
local lease = redis.call('ZSCORE', gateways, holder)
if not lease or tonumber(lease) <= now then return {'gone'} end
if redis.call('HDEL', held, 'x:' .. ref) == 1 then return {'cancelled'} end
redis.call('ZREMRANGEBYSCORE', gateways, '-inf', now)
local live = redis.call('ZRANGE', gateways, 0, -1)
local n = tonumber(amount)
for i = 6, #ARGV, 2 do
  local scope, limit = ARGV[i], tonumber(ARGV[i + 1])
  if limit >= 0 then
    local committed = tonumber(redis.call('HGET', spent, scope) or '0')
    for _, other in ipairs(live) do
      committed = committed + tonumber(redis.call('HGET', prefix .. ':held:' .. other, scope) or '0')
    end
    if committed >= limit or (whole and committed + n > limit) then
      return {'exceeded', scope, string.format('%.0f', committed)}
    end
  end
end
for i = 6, #ARGV, 2 do
  redis.call('HINCRBY', held, ARGV[i], amount)
end
redis.call('HINCRBY', held, 'r:' .. ref, amount)
redis.call('PEXPIREAT', held, lease)
return {'ok'}
"""

# Lua: settle. KEYS: the holder's holds, the reservation month's spend.
# ARGV: mode, the actual cost, the spend's TTL, the number of scopes, the
# scopes, then ref, amount pairs. Mode "settle": give the holds back and add
# the cost; "again" (a settlement sent before may have been carried out):
# add the cost only if a hold was still there to give back; "cancel" (a
# reserve that timed out): give back what it took, or leave a tombstone
# that voids it should it still arrive.
_SETTLE = """
local held, spent = KEYS[1], KEYS[2]
local mode, actual, ttl, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local live = redis.call('EXISTS', held) == 1
local given = false
for i = 5 + n, #ARGV, 2 do
  local field = 'r:' .. ARGV[i]
  local take = math.min(tonumber(redis.call('HGET', held, field) or '0'), tonumber(ARGV[i + 1]))
  if take > 0 then
    given = true
    if redis.call('HINCRBY', held, field, -take) <= 0 then redis.call('HDEL', held, field) end
    for j = 5, 4 + n do
      if redis.call('HINCRBY', held, ARGV[j], -take) <= 0 then redis.call('HDEL', held, ARGV[j]) end
    end
  elseif mode == 'cancel' and live then
    redis.call('HSET', held, 'x:' .. ARGV[i], 1)
  end
end
if actual ~= '0' and (mode == 'settle' or given) then
  for j = 5, 4 + n do
    redis.call('HINCRBY', spent, ARGV[j], actual)
  end
  redis.call('EXPIRE', spent, ttl)
end
return 1
"""

# Lua: raise each scope's spend to at least the ledger's. KEYS: the month's
# spend. ARGV: the TTL, then scope, amount pairs.
_RAISE = """
for i = 2, #ARGV, 2 do
  local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if stored < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

@dataclass(slots=True)
class _Settlement:
    """One settlement (or cancellation) waiting to be sent."""

    mode: str  # "settle", "again" (sent before, maybe carried out), "cancel"
    holder: str
    scopes: tuple[str, ...]
    parts: tuple[tuple[str, int], ...]
    month: str
    actual: int


class RedisBudgets(Budgets):
    """Budgets in Redis, for every gateway that shares it."""

    def __init__(self, presence: Presence, clock: Callable[[], float] = time.time) -> None:
        self._presence = presence
        self._redis = presence.redis
        self._prefix = presence.prefix
        self._clock = clock
        self._limits: dict[str, int] = {}
        self._refs = itertools.count(1)
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._raise = self._redis.register_script(_RAISE)
        self._outbox: Outbox[_Settlement] = Outbox("budget settlements", self._send)
        # The ledger's spend this month (``load_spent``), raised to in ``start``.
        self._seed: tuple[str, list[str | int]] | None = None

    def _spent_key(self, month: str) -> str:
        return f"{self._prefix}:spent:{month}"

    def _month(self) -> str:
        return month_bounds(self._clock())[0]

    def load_spent(self, month: str, spent: Mapping[str, int]) -> None:
        # Synchronous in the contract: sent by ``start``.
        if not spent or month != self._month():
            return
        args: list[str | int] = [_SPENT_TTL_SECONDS]
        for scope, amount in spent.items():
            args += [scope, amount]
        self._seed = (month, args)

    async def start(self) -> None:
        """Raise Redis's spend to the ledger's where the ledger has more (Redis
        restarted empty, or a killed gateway's settlements were lost), then
        send settlements in the background."""
        if self._seed is not None:
            month, args = self._seed
            await self._raise(keys=[self._spent_key(month)], args=args)
        self._outbox.start()

    async def reserve(
        self, scopes: Sequence[str], amount: int, *, whole: bool = False
    ) -> Reservation:
        if amount < 0:
            raise ValueError(f"cannot reserve a negative amount: {amount}")
        month = self._month()
        if all(scope not in self._limits for scope in scopes):
            # No budget to check, none to hold against: no round trip. Its
            # cost is still added to the month's spend when it settles.
            return Reservation(tuple(scopes), amount, month)
        for _ in range(2):
            holder = self._presence.holder
            ref = f"{next(self._refs)}"
            args: list[str | int] = [self._prefix, holder, ref, amount, "1" if whole else "0"]
            for scope in scopes:
                args += [scope, self._limits.get(scope, -1)]
            try:
                answer = await self._reserve(
                    keys=[self._presence.gateways_key, self._spent_key(month),
                          self._presence.held_key(holder)],
                    args=args,
                )
            except RedisError as exc:
                # It may yet be carried out: cancel it by its reference.
                self._outbox.put(
                    _Settlement("cancel", holder, tuple(scopes), ((ref, amount),), month, 0))
                raise shared_state_unavailable(exc) from exc
            verdict = _text(answer[0])
            if verdict == "ok":
                return Reservation(tuple(scopes), amount, month, holder=holder,
                                   parts=((ref, amount),))
            if verdict == "exceeded":
                scope = _text(answer[1])
                raise BudgetExceeded(scope, self._limits[scope], int(_text(answer[2])))
            # "gone": this gateway's lease lapsed (a stall longer than its TTL).
            try:
                await self._presence.renew()
            except RedisError as exc:
                raise shared_state_unavailable(exc) from exc
        raise shared_state_unavailable(RuntimeError("this gateway's lease in Redis keeps lapsing"))

    async def carve(self, hold: Reservation, amount: int) -> Reservation:
        if amount < 0:
            raise ValueError(f"cannot reserve a negative amount: {amount}")
        # Holds made under a lease that has since lapsed were given back with it.
        live = not hold.settled and (not hold.parts or hold.holder == self._presence.holder)
        taken = min(amount, hold.amount) if live else 0
        # The part the hold has moves over by reference (no round trip); the
        # part it lacks is reserved afresh.
        fresh = await self.reserve(hold.scopes, amount - taken) if taken < amount else None
        moved = _take_parts(hold, taken)
        hold.amount -= taken
        if fresh is None:
            return Reservation(hold.scopes, amount, hold.month, holder=hold.holder, parts=moved)
        fresh.amount = amount
        fresh.parts = moved + fresh.parts
        return fresh

    def settle(self, reservation: Reservation, actual: int) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        # A request that began last month is that month's cost: its month's hash.
        self._outbox.put(_Settlement("settle", reservation.holder, reservation.scopes,
                                     reservation.parts, reservation.month, actual))

    def set_limits(self, limits: Mapping[str, int]) -> None:
        self._limits = dict(limits)

    def limit(self, scope: str) -> int | None:
        return self._limits.get(scope)

    async def committed(self, scope: str) -> tuple[int, int]:
        """This month's settled spend in ``scope`` and what live gateways'
        requests hold there now (pico-USD), as Redis has them."""
        spent = await self._redis.hget(self._spent_key(self._month()), scope)
        held = 0
        for holder in await self._redis.zrange(self._presence.gateways_key, 0, -1):
            assert isinstance(holder, bytes)  # a plain member list: no scores asked for
            value = await self._redis.hget(self._presence.held_key(holder.decode()), scope)
            held += int(value or 0)
        return int(spent or 0), held

    async def _send(self, batch: list[_Settlement], again: bool) -> None:
        # One transaction: a batch is carried out whole or not at all.
        async with self._redis.pipeline(transaction=True) as pipe:
            for item in batch:
                # Sent before and maybe carried out: add no cost twice.
                mode = "again" if again and item.mode == "settle" and item.parts else item.mode
                args: list[str | int] = [mode, item.actual, _SPENT_TTL_SECONDS,
                                         len(item.scopes), *item.scopes]
                for ref, amount in item.parts:
                    args += [ref, amount]
                await self._settle(
                    keys=[self._presence.held_key(item.holder), self._spent_key(item.month)],
                    args=args, client=pipe,
                )
            await pipe.execute()

    async def close(self) -> None:
        """Send what is queued (for up to 5 s), then stop."""
        unsent = await self._outbox.close()
        if unsent:
            log.error("%d budget settlements could not be sent to Redis; the ledger has "
                      "their costs, and the next gateway to start raises the spend to it", unsent)


def _take_parts(hold: Reservation, amount: int) -> tuple[tuple[str, int], ...]:
    """Move up to ``amount`` out of ``hold``'s parts in Redis (earliest first):
    the parts moved. (A hold made where no scope had a budget has none.)"""
    moved: list[tuple[str, int]] = []
    left: list[tuple[str, int]] = []
    for ref, have in hold.parts:
        take = min(have, amount)
        amount -= take
        if take:
            moved.append((ref, take))
        if have - take:
            left.append((ref, have - take))
    hold.parts = tuple(left)
    return tuple(moved)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
