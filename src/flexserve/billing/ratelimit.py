"""Requests- and tokens-per-minute limits, per organization and tier.

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

import math
import time
from collections.abc import Callable, Mapping
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

    def until_full(self) -> float:
        return max(0.0, (self.capacity - self.level) * 60.0 / self.capacity)

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


class RateLimiter:
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
            raise RateLimitError(
                f"Rate limit reached for {tier.value} requests in this organization on "
                f"{what} per minute: limit {bucket.capacity}. Please try again in "
                f"{go_duration(wait)}.",
                retry_after=wait,
                headers=_headers(requests, token_bucket),
            )
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


def _headers(requests: _Bucket | None, tokens: _Bucket | None) -> dict[str, str]:
    headers = {}
    for bucket, what in ((requests, "requests"), (tokens, "tokens")):
        if bucket is not None:
            headers[f"x-ratelimit-limit-{what}"] = str(bucket.capacity)
            headers[f"x-ratelimit-remaining-{what}"] = str(max(0, math.floor(bucket.level)))
            headers[f"x-ratelimit-reset-{what}"] = go_duration(bucket.until_full())
    return headers


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
