"""Wait estimates for flex: how fast the flex queue is moving.

The queue moves at the rate flex requests are released onto replicas; a
waiter at position p expects to wait about p / rate. The rate is measured
over a sliding window, so the estimate follows the spare capacity as default
traffic rises and falls.
"""

from __future__ import annotations

from collections import deque


class RateWindow:
    """Events per second over a sliding window (flex admissions, for wait estimates)."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self._times: deque[float] = deque()

    def record(self, now: float) -> None:
        self._times.append(now)
        self._trim(now)

    def rate(self, now: float) -> float | None:
        """Events per second, or None with too few events to say."""
        self._trim(now)
        if len(self._times) < 3:
            return None
        span = max(now - self._times[0], 1e-3)
        return len(self._times) / span

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()


def estimate_wait(position: int, admission_rate: float | None) -> float | None:
    """Seconds until the waiter at ``position`` (1 = next) is released, or None
    when there is no recent rate to estimate from."""
    if admission_rate is None or admission_rate <= 0:
        return None
    return position / admission_rate
