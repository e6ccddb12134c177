"""Requests- and tokens-per-minute limits, per organization and tier.

(And ``CallRate``: a plain calls-per-minute limit per organization for an
endpoint whose cost is the call itself, such as a verification submission.)

Each limit is a token bucket that holds one minute's allowance and refills
continuously. ``RateLimiter.take`` checks both buckets and takes from both in
one synchronous step — no ``await`` anywhere in it — so requests that arrive
at the same instant on the one event loop are let through one by one, and
never more than the limit.

Tokens are taken as an estimate at admission (prompt + ``max_tokens``) and
corrected when the request ends (``settle``), as OpenAI does: a request that
used fewer tokens gives the rest back, one that used more leaves the bucket
in debt. A request bigger than a whole minute's tokens is let through when
the bucket is full rather than never.

The headers are OpenAI's: ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests`` and the
same for ``-tokens``; resets are Go-style durations (``"1s"``, ``"6m0s"``,
``"20ms"``), as OpenAI sends them.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from flexserve.errors import RateLimitError
from flexserve.tiers import ServiceTier


@dataclass(frozen=True, slots=True)
class RateLimit:
    """An organization's limits on one tier; None: unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class _Bucket:
    """A minute's allowance that refills at ``capacity`` per 60 seconds."""

    __slots__ = ("capacity", "level", "updated_at")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.updated_at = now

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated_at)
        self.level = min(float(self.capacity), self.level + elapsed * self.capacity / 60.0)
        self.updated_at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` (capped at a full bucket) is there."""
        need = min(amount, float(self.capacity)) - self.level
        return 0.0 if need <= 0 else need * 60.0 / self.capacity

    def resize(self, capacity: int) -> None:
        self.level = min(self.level, float(capacity))
        self.capacity = capacity


@dataclass(eq=False, slots=True)
class RateTake:
    """What one admitted request took from its buckets."""

    key: tuple[str, ServiceTier]
    tokens: int  # the estimate taken from the tokens bucket
    headers: dict[str, str]
    settled: bool = False


class RateLimits(abc.ABC):
    """Requests- and tokens-per-minute limits per (organization, tier). The
    contract: ``acquire`` takes one request and the estimated tokens from
    both buckets or raises RateLimitError (429) having taken nothing; ``settle``
    corrects the tokens to what the request used and ``give_back`` undoes a
    take, each once and never blocking. ``RateLimiter`` keeps the buckets in
    this process; ``flexserve.shared.ratelimit.RedisRateLimits`` in Redis,
    for every gateway that shares it."""

    @abc.abstractmethod
    def set_limits(self, limits: Mapping[tuple[str, ServiceTier], RateLimit]) -> None: ...

    @abc.abstractmethod
    async def acquire(self, org_id: str, tier: ServiceTier, tokens: int) -> RateTake: ...

    @abc.abstractmethod
    def settle(self, take: RateTake, actual_tokens: int) -> None: ...

    @abc.abstractmethod
    def give_back(self, take: RateTake) -> None: ...

    async def start(self) -> None:
        """Begin; nothing to do for limits kept in this process."""

    async def close(self) -> None:
        """Hand over what is still queued; nothing for this process's."""


class RateLimiter(RateLimits):
    """Token buckets per (organization, tier), for the limits an operator set."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._limits: dict[tuple[str, ServiceTier], RateLimit] = {}
        self._requests: dict[tuple[str, ServiceTier], _Bucket] = {}
        self._tokens: dict[tuple[str, ServiceTier], _Bucket] = {}

    def set_limits(self, limits: Mapping[tuple[str, ServiceTier], RateLimit]) -> None:
        """Replace every limit; buckets of unchanged limits keep their level."""
        now = self._clock()
        self._limits = dict(limits)
        for buckets, attribute in (
            (self._requests, "requests_per_minute"),
            (self._tokens, "tokens_per_minute"),
        ):
            for key in list(buckets):
                capacity = getattr(self._limits.get(key, RateLimit()), attribute)
                if capacity is None:
                    del buckets[key]
                else:
                    buckets[key].refill(now)
                    buckets[key].resize(capacity)
            for key, limit in self._limits.items():
                capacity = getattr(limit, attribute)
                if capacity is not None and key not in buckets:
                    buckets[key] = _Bucket(capacity, now)

    async def acquire(self, org_id: str, tier: ServiceTier, tokens: int) -> RateTake:
        # No await in ``take``: requests arriving together pass one by one.
        return self.take(org_id, tier, tokens)

    def take(self, org_id: str, tier: ServiceTier, tokens: int) -> RateTake:
        """Take one request and ``tokens`` tokens, or raise RateLimitError (429)
        having taken nothing."""
        key = (org_id, tier)
        requests = self._requests.get(key)
        token_bucket = self._tokens.get(key)
        if requests is None and token_bucket is None:
            return RateTake(key, tokens, {})
        now = self._clock()
        waits = []
        for bucket, amount, what in ((requests, 1, "requests"), (token_bucket, tokens, "tokens")):
            if bucket is not None:
                bucket.refill(now)
                wait = bucket.wait_for(amount)
                if wait > 0:
                    waits.append((wait, what, bucket))
        if waits:
            wait, what, bucket = max(waits, key=lambda w: w[0])
            raise limit_reached(tier, what, bucket.capacity, wait,
                                _headers(requests, token_bucket))
        if requests is not None:
            requests.level -= 1
        if token_bucket is not None:
            token_bucket.level -= tokens
        return RateTake(key, tokens, _headers(requests, token_bucket))

    def settle(self, take: RateTake, actual_tokens: int) -> None:
        """Correct the tokens taken to what the request used (once)."""
        if take.settled:
            return
        take.settled = True
        bucket = self._tokens.get(take.key)
        if bucket is not None:
            bucket.refill(self._clock())
            bucket.level = min(float(bucket.capacity), bucket.level + take.tokens - actual_tokens)

    def give_back(self, take: RateTake) -> None:
        """Undo a take whose request was refused for another reason before it
        was queued: it counts neither as a request nor as tokens."""
        if take.settled:
            return
        take.settled = True
        requests = self._requests.get(take.key)
        if requests is not None:
            requests.level = min(float(requests.capacity), requests.level + 1)
        tokens = self._tokens.get(take.key)
        if tokens is not None:
            tokens.level = min(float(tokens.capacity), tokens.level + take.tokens)


class CallRate:
    """A calls-per-minute token bucket per organization, for one costly endpoint.

    Buckets are made on an organization's first call and dropped once full
    again (the organization has been quiet for a minute), so the table holds
    only the organizations calling now.
    """

    def __init__(
        self, per_minute: int, what: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1, not {per_minute}")
        self._per_minute = per_minute
        self._what = what  # the calls, as the 429's message names them
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        # Table size at which full buckets are next swept out (doubles with
        # the organizations calling at once, so a sweep costs O(1) per call).
        self._sweep_at = 1024

    def take(self, org_id: str) -> None:
        """Take one call, or raise RateLimitError (429, Retry-After) having taken nothing."""
        now = self._clock()
        bucket = self._buckets.get(org_id)
        if bucket is None:
            self._forget_full(now)
            bucket = self._buckets[org_id] = _Bucket(self._per_minute, now)
        bucket.refill(now)
        wait = bucket.wait_for(1)
        if wait > 0:
            raise RateLimitError(
                f"Rate limit reached for {self._what} in this organization: limit "
                f"{self._per_minute} per minute. Please try again in {go_duration(wait)}.",
                retry_after=wait,
            )
        bucket.level -= 1

    def give_back(self, org_id: str) -> None:
        """Undo a take whose call was refused for another reason (503): it does not count."""
        bucket = self._buckets.get(org_id)
        if bucket is not None:
            bucket.level = min(float(bucket.capacity), bucket.level + 1)

    def _forget_full(self, now: float) -> None:
        if len(self._buckets) < self._sweep_at:
            return
        for org_id, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.level >= bucket.capacity:
                del self._buckets[org_id]
        self._sweep_at = max(1024, 2 * len(self._buckets))


def limit_reached(
    tier: ServiceTier, what: str, capacity: int, wait: float, headers: dict[str, str]
) -> RateLimitError:
    """The 429 for a request past its ``what`` ("requests"/"tokens") per minute."""
    return RateLimitError(
        f"Rate limit reached for {tier.value} requests in this organization on "
        f"{what} per minute: limit {capacity}. Please try again in {go_duration(wait)}.",
        retry_after=wait,
        headers=headers,
    )


def limit_headers(buckets: Iterable[tuple[str, int, float]]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for (what, capacity, level) buckets."""
    headers = {}
    for what, capacity, level in buckets:
        headers[f"x-ratelimit-limit-{what}"] = str(capacity)
        headers[f"x-ratelimit-remaining-{what}"] = str(max(0, math.floor(level)))
        until_full = max(0.0, (capacity - level) * 60.0 / capacity) if capacity else 0.0
        headers[f"x-ratelimit-reset-{what}"] = go_duration(until_full)
    return headers


def _headers(requests: _Bucket | None, tokens: _Bucket | None) -> dict[str, str]:
    return limit_headers(
        (what, bucket.capacity, bucket.level)
        for bucket, what in ((requests, "requests"), (tokens, "tokens"))
        if bucket is not None
    )


def go_duration(seconds: float) -> str:
    """A duration as Go prints it and OpenAI sends it: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    millis = math.ceil(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms"
    minutes, millis = divmod(millis, 60_000)
    hours, minutes = divmod(minutes, 60)
    secs = f"{millis / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
