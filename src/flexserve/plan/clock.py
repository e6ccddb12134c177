"""A virtual clock for asyncio: time passes only when everything waits.

The planner runs the gateway's real scheduler and the sim engine in one
event loop whose clock jumps, whenever no callback is ready, straight to the
next timer: a step of the engine that takes 30 ms of simulated time costs
only the Python that computes it. ``time.monotonic`` answers with the
virtual clock in the thread that ``run`` runs in, for as long as it runs
(the scheduler and the engine read it at call time), and with the real one
in every other thread (a server the same process runs keeps real time).

Only in-process work can run on it: there is no I/O to wait for (a
socket's answer would arrive in real time while the clock races ahead).
``run`` fails if the loop would wait with no timer pending, rather than
hang.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")
# Where virtual time starts: anything positive (code may treat 0 as "never").
_ORIGIN = 1_000_000.0


class Deadlock(RuntimeError):
    """Everything waits and no timer is pending: the run can never go on."""


class VirtualClock:
    def __init__(self, start: float = _ORIGIN) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class _VirtualSelector(selectors.DefaultSelector):
    """The loop's selector: it polls what is registered (the loop's own
    wake-up pipe) without blocking, and where the loop would block for
    ``timeout`` it moves the clock on by that much instead."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise Deadlock("every task waits and no timer is pending")
        self._clock.now += timeout
        return []


def run(main: Coroutine[Any, Any, _T], clock: VirtualClock | None = None) -> _T:
    """Run ``main`` to its end on a virtual clock; return its result."""
    clock = clock or VirtualClock()
    loop = asyncio.SelectorEventLoop(_VirtualSelector(clock))
    real = time.monotonic
    owner = threading.get_ident()

    def monotonic() -> float:
        return clock.now if threading.get_ident() == owner else real()

    time.monotonic = monotonic
    try:
        return loop.run_until_complete(main)
    finally:
        time.monotonic = real
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
