"""One request sent the way a flex client should send it.

``send`` posts one body to an OpenAI-compatible endpoint through the
official SDK (its own retries off: the waiting here is honest, not blind)
and keeps at it until an answer, a final error, or a deadline:

- **429 and 5xx** are retried after the server's ``Retry-After`` (or
  ``retry-after-ms``), else after a jittered exponential backoff; a refusal
  is never an answer while there is time left.
- **``x-should-retry``** wins: ``false`` makes any error final, ``true``
  makes it worth another try.
- **Other 4xx are final**: a bad request sent again is the same bad request.
- **Fallback**: a flex request still unanswered ``fallback_after`` seconds
  after its first try is sent at ``fallback_tier`` instead (OpenAI's advice
  for flex: fall back to default when time runs short).
- **Waiting in the server's queue** rather than being refused: flex requests
  carry ``X-Flex-Max-Wait``, the time left until the fallback or the
  deadline, so FlexServe queues them that long (other servers ignore it).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import openai

# Statuses worth another try unless the server says otherwise.
RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504})
# Failures other than refusals (5xx, lost connections) tried at most this often in a row.
MAX_FAILURES = 5


@dataclass(frozen=True)
class CallPolicy:
    """How one request is sent: its tier and what to do when it waits."""

    # service_tier sent (None: the body's own, or none).
    tier: str | None = "flex"
    # Sent at this tier instead once ``fallback_after`` seconds have passed.
    fallback_tier: str | None = None
    fallback_after: float | None = None
    # Longest pause between tries when the server names none.
    max_backoff: float = 30.0


@dataclass
class Outcome:
    """What became of one request."""

    ok: bool
    status: int | None
    # The answer's JSON (ok), or the last error's JSON body if it had one.
    body: Any
    request_id: str | None
    # The tier asked for on the last try, and the one the answer says it was served at.
    tier: str | None
    served_tier: str | None
    attempts: int = 0
    refusals: int = 0
    fell_back: bool = False
    # Why it failed for good (None when ok).
    error: str | None = None
    error_code: str | None = None
    seconds: float = 0.0
    # Pauses taken after refusals, as asked (Retry-After) and as slept.
    waits: list[tuple[float | None, float]] = field(default_factory=list)

    @property
    def usage(self) -> Mapping[str, Any]:
        usage = self.body.get("usage") if self.ok and isinstance(self.body, dict) else None
        return usage if isinstance(usage, dict) else {}


class Events:
    """Hooks a caller may override to follow the tries (progress, pacing)."""

    def refused(self, status: int, retry_after: float | None) -> None:
        """A try was refused with ``status`` (429 or 5xx) and will be retried."""

    def answered(self, seconds: float) -> None:
        """A try was answered (200) after ``seconds``."""


async def send(
    client: openai.AsyncOpenAI,
    path: str,
    body: Mapping[str, Any],
    policy: CallPolicy,
    *,
    deadline: float | None = None,
    events: Events | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Send ``body`` to ``path`` (``/chat/completions``…) until it is answered,
    fails for good, or ``deadline`` (a ``clock()`` time) passes."""
    events = events or Events()
    started = clock()
    tier = policy.tier
    outcome = Outcome(False, None, None, None, tier, None)
    failures = 0
    while True:
        now = clock()
        if deadline is not None and now >= deadline:
            outcome.error, outcome.error_code = "the job's deadline passed", "deadline_exceeded"
            break
        fallback_at = _fallback_at(policy, started, outcome.fell_back)
        if fallback_at is not None and now >= fallback_at:
            tier, outcome.fell_back = policy.fallback_tier, True
        outcome.tier = tier
        headers: dict[str, str] = {}
        # The next moment this request changes: its fallback, or the deadline.
        until = min((t for t in (deadline, fallback_at if not outcome.fell_back else None)
                     if t is not None), default=None)
        if tier == "flex" and until is not None:
            headers["X-Flex-Max-Wait"] = f"{max(0.0, until - now):.1f}"
        sent = dict(body)
        if tier is not None:
            sent["service_tier"] = tier
        outcome.attempts += 1
        try:
            answer = await client.post(path, cast_to=object, body=sent,
                                       options={"headers": headers})
        except openai.APIStatusError as exc:
            outcome.status, outcome.body = exc.status_code, _json_or_none(exc.response)
            outcome.request_id = exc.response.headers.get("x-request-id")
            should = exc.response.headers.get("x-should-retry")
            retryable = should == "true" or (should != "false" and exc.status_code in RETRYABLE)
            if not retryable:
                outcome.error, outcome.error_code = _error(exc)
                break
            refused = exc.status_code == 429
            failures = 0 if refused else failures + 1
            if failures >= MAX_FAILURES:
                outcome.error, outcome.error_code = _error(exc)
                break
            asked = _retry_after(exc.response.headers)
            outcome.refusals += refused
            events.refused(exc.status_code, asked)
            pause = asked if asked is not None else _backoff(outcome.attempts, policy.max_backoff)
            # Wake for the fallback or the deadline rather than sleep past them.
            if until is not None:
                pause = min(pause, max(0.0, until - clock()))
            outcome.waits.append((asked, pause))
            await asyncio.sleep(pause)
            continue
        except openai.APIConnectionError as exc:
            failures += 1
            outcome.status, outcome.body = None, None
            if failures >= MAX_FAILURES:
                outcome.error, outcome.error_code = f"could not reach the server: {exc}", "connection_error"
                break
            events.refused(0, None)
            await asyncio.sleep(_backoff(failures, policy.max_backoff))
            continue
        outcome.status, outcome.ok, outcome.body = 200, True, answer
        served = outcome.body.get("service_tier") if isinstance(outcome.body, dict) else None
        outcome.served_tier = served if isinstance(served, str) else tier
        events.answered(clock() - now)
        break
    outcome.seconds = clock() - started
    return outcome


def _fallback_at(policy: CallPolicy, started: float, fell_back: bool) -> float | None:
    if fell_back or policy.fallback_tier is None or policy.fallback_after is None:
        return None
    return started + policy.fallback_after


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The pause the server asked for: ``retry-after-ms``, else ``Retry-After`` in seconds."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue  # an HTTP date: rare from APIs; fall back to the backoff
        if value >= 0:
            return value
    return None


def _backoff(attempt: int, most: float) -> float:
    """Full-jitter exponential backoff: up to 0.5 s × 2^(attempt−1), at most ``most``."""
    return random.uniform(0.0, min(most, 0.5 * 2 ** max(0, attempt - 1)))


def _json_or_none(response: Any) -> Any:
    """The JSON body of an error response (the SDK's transport's), if it has one."""
    try:
        return json.loads(response.content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _error(exc: openai.APIStatusError) -> tuple[str, str]:
    """The reason an error is final, and its code (the server's, else ``http_<status>``)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    error = error if isinstance(error, dict) else {}
    message, code = error.get("message"), error.get("code")
    return (f"{exc.status_code}: {message or exc.message}",
            str(code) if code is not None else f"http_{exc.status_code}")
