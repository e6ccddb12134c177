"""Rate limits shared by every gateway, in Redis.

The contract is ``flexserve.billing.ratelimit.RateLimits``'s, and the
buckets are ``RateLimiter``'s: a minute's allowance per (organization,
tier) that refills continuously, one for requests and one for tokens. In
Redis each bucket is a hash (``{prefix}:rate:{org}:{tier}:requests`` and
``…:tokens``: its level and when it was last refilled, by Redis's clock),
checked and taken from by one Lua script for both at once. So across all
gateways a minute admits at most the limit, give or take one request (the
last one admitted while the bucket had anything left of a whole request).

A bucket untouched for two minutes expires: it would be full again after
one. An organization and tier with no limit make no round trip. Corrections
(``settle``) and give-backs are queued (``outbox``) and sent in the
background; sent twice after a timeout, one credits a bucket twice, which
errs towards the client by at most one request's estimate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from redis.exceptions import RedisError

from flexserve.billing.ratelimit import RateLimit, RateLimits, RateTake, limit_headers, limit_reached
from flexserve.shared.errors import shared_state_unavailable
from flexserve.shared.outbox import Outbox
from flexserve.shared.presence import Presence
from flexserve.tiers import ServiceTier

log = logging.getLogger(__name__)

_IDLE_TTL_SECONDS = 120

# Lua: the level of each bucket now, refilled; take from both, or neither.
# KEYS: the requests bucket, the tokens bucket. ARGV: their capacities (-1:
# no limit), the tokens to take. Returns {1, requests level, tokens level} or
# {0, requests level, tokens level, requests wait, tokens wait} (levels -1
# where there is no limit), as strings.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, capacity)
  local stored = redis.call('HMGET', key, 'level', 'at')
  local value, at = tonumber(stored[1]), tonumber(stored[2])
  if not value then return capacity end
  return math.min(capacity, value + math.max(0, now - at) * capacity / 60)
end
local function wait(capacity, have, amount)
  if capacity <= 0 then return 60 end
  local need = math.min(amount, capacity) - have
  if need <= 0 then return 0 end
  return need * 60 / capacity
end
local caps = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local amounts = {1, tonumber(ARGV[3])}
local levels, waits, refused = {-1, -1}, {0, 0}, false
for i = 1, 2 do
  if caps[i] >= 0 then
    levels[i] = level(KEYS[i], caps[i])
    waits[i] = wait(caps[i], levels[i], amounts[i])
    if waits[i] > 0 then refused = true end
  end
end
if refused then
  return {0, tostring(levels[1]), tostring(levels[2]), tostring(waits[1]), tostring(waits[2])}
end
for i = 1, 2 do
  if caps[i] >= 0 then
    levels[i] = levels[i] - amounts[i]
    redis.call('HSET', KEYS[i], 'level', tostring(levels[i]), 'at', tostring(now))
    redis.call('EXPIRE', KEYS[i], ARGV[4])
  end
end
return {1, tostring(levels[1]), tostring(levels[2])}
"""

# Lua: credit a bucket (a correction or a give-back), never above its
# capacity. KEYS: the bucket. ARGV: its capacity, the amount (may be < 0).
_CREDIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local stored = redis.call('HMGET', KEYS[1], 'level', 'at')
local value, at = tonumber(stored[1]), tonumber(stored[2])
if not value then return 0 end
local capacity = tonumber(ARGV[1])
value = math.min(capacity, value + math.max(0, now - at) * capacity / 60 + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'level', tostring(value), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


@dataclass(frozen=True, slots=True)
class _Credit:
    bucket: str  # its key
    capacity: int
    amount: int


class RedisRateLimits(RateLimits):
    """Rate limits in Redis, for every gateway that shares it."""

    def __init__(self, presence: Presence) -> None:
        self._redis = presence.redis
        self._prefix = presence.prefix
        self._limits: dict[tuple[str, ServiceTier], RateLimit] = {}
        self._take = self._redis.register_script(_TAKE)
        self._credit = self._redis.register_script(_CREDIT)
        self._outbox: Outbox[_Credit] = Outbox("rate-limit corrections", self._send)

    def _bucket(self, key: tuple[str, ServiceTier], what: str) -> str:
        org_id, tier = key
        return f"{self._prefix}:rate:{org_id}:{tier.value}:{what}"

    def set_limits(self, limits: Mapping[tuple[str, ServiceTier], RateLimit]) -> None:
        self._limits = dict(limits)

    async def start(self) -> None:
        self._outbox.start()

    async def acquire(self, org_id: str, tier: ServiceTier, tokens: int) -> RateTake:
        key = (org_id, tier)
        limit = self._limits.get(key)
        if limit is None or (limit.requests_per_minute is None and limit.tokens_per_minute is None):
            return RateTake(key, tokens, {})
        capacities = (limit.requests_per_minute, limit.tokens_per_minute)
        try:
            answer = await self._take(
                keys=[self._bucket(key, "requests"), self._bucket(key, "tokens")],
                args=[-1 if capacities[0] is None else capacities[0],
                      -1 if capacities[1] is None else capacities[1], tokens, _IDLE_TTL_SECONDS],
            )
        except RedisError as exc:
            raise shared_state_unavailable(exc) from exc
        levels = (float(answer[1]), float(answer[2]))
        headers = limit_headers(
            (what, capacity, level)
            for what, capacity, level in zip(("requests", "tokens"), capacities, levels, strict=True)
            if capacity is not None
        )
        if int(answer[0]) == 1:
            return RateTake(key, tokens, headers)
        waits = {"requests": float(answer[3]), "tokens": float(answer[4])}
        what = max(waits, key=lambda name: waits[name])
        capacity = capacities[0] if what == "requests" else capacities[1]
        assert capacity is not None  # a bucket without a limit never waits
        raise limit_reached(tier, what, capacity, waits[what], headers)

    def settle(self, take: RateTake, actual_tokens: int) -> None:
        if take.settled:
            return
        take.settled = True
        self._put(take, "tokens", take.tokens - actual_tokens)

    def give_back(self, take: RateTake) -> None:
        if take.settled:
            return
        take.settled = True
        self._put(take, "requests", 1)
        self._put(take, "tokens", take.tokens)

    def _put(self, take: RateTake, what: str, amount: int) -> None:
        limit = self._limits.get(take.key)
        capacity = None if limit is None else getattr(limit, f"{what}_per_minute")
        if capacity is not None and amount:
            self._outbox.put(_Credit(self._bucket(take.key, what), capacity, amount))

    async def _send(self, batch: list[_Credit], again: bool) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for credit in batch:
                await self._credit(keys=[credit.bucket],
                                   args=[credit.capacity, credit.amount, _IDLE_TTL_SECONDS],
                                   client=pipe)
            await pipe.execute()

    async def close(self) -> None:
        unsent = await self._outbox.close()
        if unsent:
            log.warning("%d rate-limit corrections could not be sent to Redis", unsent)
