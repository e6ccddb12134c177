"""The prefill budget: how much of a replica's time prompts may take.

Every step a continuous-batching engine spends on a prompt's prefill is a step
default decodes wait through. If prefill takes a share ``s`` of the engine's
time, a decoding sequence gets a token every ``step / (1 - s)`` seconds, where
``step`` is the decode-only step time. Keeping default's time per output token
within ``tpot_slo`` therefore leaves prefill a share of at most
``1 - step / tpot_slo``, and flex may take only what default's own prompts
leave of it.

``PrefillBudget`` is a leaky bucket of engine seconds: admitting a request
charges its prompt's prefill time (``a x prompt tokens``, from the step-time
model); the bucket earns the allowed share of every wall second; flex is
admitted only while it is not in debt. Default and priority are charged too
but never held back: their prompts push flex back, not the other way round.
The same record of charges gives the share prefill has actually taken lately,
which the scheduler needs to calibrate the step-time model against observed
TPOT without counting prefill twice.
"""

from __future__ import annotations

from collections import deque

# Engine seconds of credit the bucket can bank: one long prompt's prefill on an
# H100 (~2,000 tokens at 47k tokens/s), so an idle spell cannot save up a burst.
_MAX_CREDIT = 0.05
# Seconds of charges kept to measure the share prefill has taken.
_WINDOW = 10.0


class PrefillBudget:
    """Engine seconds prompts may still take on one replica."""

    __slots__ = ("_charged_in_window", "_charges", "_credit", "_updated_at")

    def __init__(self) -> None:
        self._credit = _MAX_CREDIT
        self._updated_at: float | None = None
        self._charges: deque[tuple[float, float]] = deque()
        self._charged_in_window = 0.0

    def credit(self, now: float, share: float) -> float:
        """Engine seconds banked at ``now``, having earned ``share`` of each second
        since the last look (negative: in debt)."""
        if self._updated_at is not None and now > self._updated_at:
            earned = max(0.0, share) * (now - self._updated_at)
            self._credit = min(_MAX_CREDIT, self._credit + earned)
        self._updated_at = now
        return self._credit

    def charge(self, now: float, seconds: float) -> None:
        """Spend ``seconds`` of engine time on a prompt admitted at ``now``."""
        if seconds <= 0:
            return
        self._credit -= seconds
        self._charges.append((now, seconds))
        self._charged_in_window += seconds
        self._trim(now)

    def recent_share(self, now: float) -> float:
        """The share of engine time prompts were charged over the last window."""
        self._trim(now)
        return min(0.95, self._charged_in_window / _WINDOW)

    def _trim(self, now: float) -> None:
        while self._charges and now - self._charges[0][0] > _WINDOW:
            self._charged_in_window -= self._charges.popleft()[1]
        if not self._charges:
            self._charged_in_window = 0.0
