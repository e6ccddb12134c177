"""A gateway's lease in Redis: the gateways that are alive, by Redis's clock.

Each gateway is a member of the sorted set ``{prefix}:gateways``, scored with
the moment (Redis's ``TIME``, milliseconds) its lease ends, and renews it every
third of ``ttl``. What a gateway holds in Redis (its budget holds) is keyed
by its ``holder`` name and expires with the lease, so a gateway that dies or
stalls gives everything back within ``ttl`` without anyone cleaning up.

A gateway that finds its lease gone when it renews it (it stalled past
``ttl`` and the others dropped it) takes a new holder name: the holds made
under the old one were given back when it lapsed, and settling them later
must not take from holds made since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from redis.asyncio import Redis
from redis.exceptions import RedisError

from flexserve.shared.tasks import stop

log = logging.getLogger(__name__)

# Lua: renew ``holder``'s lease (ARGV: holder, ttl ms, "1" to take it even if
# absent). Returns 1 when it holds the lease now, 0 when the lease had lapsed
# (and was not taken again).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gateways, holder, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', gateways, '-inf', now)
if not redis.call('ZSCORE', gateways, holder) and ARGV[3] ~= '1' then return 0 end
redis.call('ZADD', gateways, now + ttl, holder)
redis.call('PEXPIREAT', KEYS[2], now + ttl)
return 1
"""


class Presence:
    """This gateway's lease, renewed in the background once ``start`` ran."""

    def __init__(self, redis: Redis, *, prefix: str, ttl: float = 15.0) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, not {ttl}")
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl
        self.gateway_id = f"gw-{secrets.token_hex(6)}"
        self._incarnation = 0
        self._renew = redis.register_script(_RENEW)
        self._task: asyncio.Task[None] | None = None

    @property
    def holder(self) -> str:
        """The name this gateway's holds are kept under now."""
        return f"{self.gateway_id}.{self._incarnation}"

    @property
    def gateways_key(self) -> str:
        return f"{self.prefix}:gateways"

    def held_key(self, holder: str) -> str:
        return f"{self.prefix}:held:{holder}"

    async def start(self) -> None:
        await self._take(self.holder, register=True)
        self._task = asyncio.create_task(self._renew_forever(), name="redis-presence")

    async def renew(self) -> None:
        """Renew the lease now; a lapsed one is taken again under a new name."""
        if await self._take(self.holder, register=False):
            return
        self._incarnation += 1
        log.warning("gateway %s lost its lease in Redis (silent past %.0f s): its holds "
                    "were given back; holding anew as %s", self.gateway_id, self.ttl, self.holder)
        await self._take(self.holder, register=True)

    async def _take(self, holder: str, *, register: bool) -> bool:
        taken = await self._renew(keys=[self.gateways_key, self.held_key(holder)],
                                  args=[holder, int(self.ttl * 1000), "1" if register else "0"])
        return bool(taken)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.renew()
            except RedisError as exc:
                log.warning("renewing gateway %s's lease in Redis failed: %s", self.gateway_id, exc)

    async def close(self) -> None:
        """Stop renewing and give the lease (and every hold under it) back now."""
        task, self._task = self._task, None
        await stop(task)
        with contextlib.suppress(RedisError):
            await self.redis.zrem(self.gateways_key, self.holder)
            await self.redis.delete(self.held_key(self.holder))
