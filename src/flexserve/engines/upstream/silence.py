"""How long an upstream may stay silent while the gateway waits on it.

A replica that hangs (a frozen process, a wedged GPU, a network that drops
packets without a reset) sends nothing and closes nothing; without a limit a
request would wait for the whole ``upstream_timeout``. aiohttp's ``sock_read``
is one figure for the whole exchange, but an upstream deserves a long silence
before its first output (queueing, and the prefill of a long prompt under
load) and only a short one between pieces of output after it.

``SilenceWatch`` keeps both limits with one timer per request, moved lazily:
each read marks when it began waiting, and the timer, when it fires, checks
whether the wait in progress has really lasted the limit, and sets itself
again if not. Time the caller spends with a delta (sending it to a slow
client) is not silence: nothing is being waited for then.

On expiry it cancels the task that is waiting; the engine turns that
cancellation into its own error (``expired_alone``), unless something else
cancelled the task as well (its client left), which then wins.
"""

from __future__ import annotations

import asyncio

# A loop whose clock counts milliseconds (uvloop) may call a timer a moment early.
_EARLY = 0.002


class SilenceWatch:
    """Cancels the waiting task once the upstream has been silent too long."""

    __slots__ = ("expired", "first_limit", "idle_limit", "limit", "_handle", "_loop", "_since", "_task")

    def __init__(self, first_limit: float, idle_limit: float) -> None:
        # Longest wait for the first byte of the answer's body (its first output).
        self.first_limit = first_limit
        # Longest wait between reads once the body has begun.
        self.idle_limit = idle_limit
        self.limit = first_limit
        self.expired = False
        self._since: float | None = None
        self._task: asyncio.Task[object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start waiting (the request is about to be sent)."""
        loop = self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._since = loop.time()
        self._handle = loop.call_at(self._since + self.limit, self._check)

    def waiting(self) -> None:
        """Before each read of the body."""
        if self._loop is not None:
            self._since = self._loop.time()

    def heard(self) -> None:
        """After each read of the body: from now on, the shorter limit."""
        self._since = None
        if self.limit != self.idle_limit:
            # Once: the timer set for the first limit may be due later than this one.
            self.limit = self.idle_limit
            if self._handle is not None and self._loop is not None:
                self._handle.cancel()
                self._handle = self._loop.call_at(self._loop.time() + self.limit, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def expired_alone(self) -> bool:
        """After a cancellation: True when it was this watch's doing and
        nothing else asked for it too (the task carries on, to raise an error)."""
        return self.expired and self._task is not None and self._task.uncancel() == 0

    def _check(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        since = self._since
        if since is not None and now >= since + self.limit - _EARLY:
            self.expired = True
            self._handle = None
            if self._task is not None:
                self._task.cancel()
            return
        due = (now if since is None else since) + self.limit
        self._handle = loop.call_at(max(due, now + _EARLY), self._check)
