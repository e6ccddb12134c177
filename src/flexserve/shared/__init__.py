"""Live state the gateways of one deployment share, kept in Redis.

One gateway keeps its budgets and rate limits in its own memory
(``flexserve.billing``). Several gateways in front of the same engines must
share them, or each lets an organization spend its whole budget and use its
whole rate limit. With ``redis`` set, that state lives in one Redis server
and is changed only by Lua scripts, so that each check-and-take is one
atomic step for all gateways at once.

- ``presence``: each gateway's lease in Redis (renewed by heartbeat); what a
  gateway holds goes with its lease when it stops renewing it;
- ``budgets``: ``RedisBudgets``, the budgets' contract across gateways;
- ``ratelimit``: ``RedisRateLimits``, the rate limits' likewise;
- ``capacity``: ``SharedSlots``, each gateway's lease on each replica's slots;
- ``changes``: the CLI's announcements that the database changed;
- ``outbox``: the writes a request does not wait for, sent in the background;
- ``connect``: a gateway's connection to Redis, from its settings.

One Redis server (or a primary with replicas), not a Redis Cluster: the
scripts read the keys of every live gateway.
"""
