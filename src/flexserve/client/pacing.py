"""How many requests a job keeps in flight.

Fixed (``--concurrency N``) or adaptive: additive increase, multiplicative
decrease (AIMD, as TCP paces a connection), on the server's own signals:

- every answered request raises the limit by 1/limit (one more per round of
  answers), while answers come no slower than ``latency_factor`` × the
  fastest seen (a queue building up behind the limit is a signal too); until
  the first such signal, by 1 (slow start: the limit doubles each round);
- a refusal (429, or a 5xx) halves it, at most once per ``cooldown`` seconds
  (the refusals of one burst are one signal, not many);
- where the server publishes ``/v1/flex/status`` (FlexServe), it guides the
  limit: no new request starts while the status says a flex request would
  be refused now (``accepting: false``), and the limit grows only while it
  reports spare capacity or an empty queue.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai

from flexserve.client.calls import Events


class Pacer(Events):
    """The limit on requests in flight, and a gate that holds to it."""

    def __init__(self, *, fixed: int | None = None, start: int = 8, minimum: int = 1,
                 maximum: int = 512, cooldown: float = 1.0, latency_factor: float = 3.0) -> None:
        self.fixed = fixed
        self.limit = float(fixed or start)
        self.minimum, self.maximum = minimum, maximum
        self.cooldown = cooldown
        self.latency_factor = latency_factor
        self.in_flight = 0
        self.fastest: float | None = None
        self.last_cut = float("-inf")
        # Set by the status guide: False while the server would refuse flex now.
        self.accepting = True
        self.may_grow = True
        self.slow_start = True
        self._changed = asyncio.Condition()

    @property
    def allowed(self) -> int:
        return max(self.minimum, int(self.limit))

    async def acquire(self) -> None:
        """Wait for room under the limit (and, guided, for the server to accept)."""
        async with self._changed:
            # While the server would refuse flex, one request still goes (it
            # waits out its Retry-After, or falls back, as any refused one).
            await self._changed.wait_for(
                lambda: self.in_flight < self.allowed and (self.accepting or self.in_flight == 0))
            self.in_flight += 1

    async def release(self) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def refused(self, status: int, retry_after: float | None) -> None:
        if self.fixed is not None:
            return
        now = time.monotonic()
        self.slow_start = False
        if now - self.last_cut >= self.cooldown:
            self.limit = max(float(self.minimum), self.limit / 2)
            self.last_cut = now

    def answered(self, seconds: float) -> None:
        if self.fixed is not None:
            return
        self.fastest = seconds if self.fastest is None else min(self.fastest, seconds)
        slow = seconds > self.latency_factor * max(self.fastest, 0.05)
        if slow:
            self.slow_start = False
        elif self.may_grow:
            step = 1.0 if self.slow_start else 1.0 / self.limit
            self.limit = min(float(self.maximum), self.limit + step)
        # The run's release wakes the waiters, under the new limit.

    async def follow_status(self, client: openai.AsyncOpenAI, model: str, max_wait: float | None,
                            every: float = 1.0) -> None:
        """Until cancelled, read ``/v1/flex/status`` for ``model`` every
        ``every`` seconds and let it guide the limit; returns at once where
        the server has no such endpoint (the limit then follows AIMD alone)."""
        params: dict[str, Any] = {"model": model}
        if max_wait is not None:
            params["max_wait"] = round(max_wait, 1)
        while True:
            try:
                answer = await client.get("/flex/status", cast_to=object,
                                          options={"params": params})
                entry = ((answer.get("data") if isinstance(answer, dict) else None) or [{}])[0]
            except (openai.NotFoundError, openai.BadRequestError, openai.AuthenticationError,
                    openai.PermissionDeniedError):
                self.accepting, self.may_grow = True, True
                await self._notify()
                return  # not FlexServe (or not for this key): AIMD alone
            except (openai.APIError, ValueError, AttributeError, IndexError):
                entry = {}
            accepting = entry.get("accepting")
            self.accepting = accepting is not False
            spare = entry.get("spare_capacity")
            depth = entry.get("queue_depth")
            self.may_grow = (isinstance(spare, (int, float)) and spare > 0) or depth == 0 or not entry
            await self._notify()
            await asyncio.sleep(every)
