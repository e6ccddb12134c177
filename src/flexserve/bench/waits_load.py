"""The flex clients of ``flexserve bench waits``: what a careful client does, timed.

Each flex request is one client's: it reads ``GET /v1/flex/status`` for its
model and deadline just before sending (the estimate it was *told*), then
sends the request streamed with ``X-Flex-Max-Wait`` and the ``place`` that
read held (``X-Flex-Place``), and keeps the gateway's
``x-flex-estimated-wait`` header (the estimate the gateway *recorded*). A
follow-up of a refusal names, in its read, the place the 429 said was held
for it (``x-flex-place``).

A refused request (429 ``resource_unavailable`` on arrival) is followed up in
one of two ways, alternately by request number, so that neither follow-up
disturbs the other's measurement:

- **retry**: wait exactly ``Retry-After`` and send the same request with the
  same deadline again (up to ``max_retries`` times, while ``Retry-After``
  stays under ``retry_cap``);
- **probe**: send the same request again at once without a deadline of its
  own (the server's ``flex_max_wait``): if it then starts within the deadline
  the first one was refused for, that refusal was false.

How long a served request waited comes afterwards from the gateway's ledger
(``usage_records.queue_time_ms``, by ``x-request-id``); the time to the
response headers (the gateway sends them with the first token) is kept as a
cross-check.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from flexserve.bench.tiers_load import Target, scrape
from flexserve.bench.traffic import Job, LengthMix, messages_for

__all__ = [
    "Attempt",
    "FlexRequest",
    "LoadSample",
    "Sampler",
    "fill_from_ledger",
    "flex_requests",
    "run_request",
    "sample_load",
]

ESTIMATE_HEADER = "x-flex-estimated-wait"
# A 429 that comes back sooner than this share of its deadline was a refusal on
# arrival; a later one was queued first and then given up on (expired or shed).
_ARRIVAL_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class FlexRequest:
    """One flex client's request: what it sends and with which deadline."""

    index: int
    job: Job
    # X-Flex-Max-Wait, seconds.
    deadline: float
    # What the client does if refused: "retry" (at Retry-After) or "probe" (again at once).
    follow_up: str


@dataclass(slots=True)
class Attempt:
    """One send of a flex request, on this process's monotonic clock."""

    request: int
    # "first", "retry" or "probe".
    kind: str
    # X-Flex-Max-Wait sent; None: none (the server's own limit).
    deadline: float | None
    sent_at: float = 0.0
    # The status read just before sending: p50, p90, accepting; None where absent.
    status_estimate: float | None = None
    status_p90: float | None = None
    status_accepting: bool | None = None
    # The status answer had a p90 field at all (the estimator reports intervals).
    status_has_p90: bool = False
    # The place that read held, sent back in X-Flex-Place (None: none reported).
    status_place: str | None = None
    # On a 429: the place held for the request (x-flex-place), named in its follow-up's read.
    refusal_place: str | None = None
    status: int = 0
    code: str | None = None
    request_id: str | None = None
    header_estimate: float | None = None
    retry_after: float | None = None
    # When the response headers arrived (the first token, for a served flex request).
    headers_at: float | None = None
    done_at: float = 0.0
    completed: bool = False
    error: str | None = None
    # Seconds from arrival to an engine taking it, from the ledger.
    queue_time: float | None = None
    # Retry-After was missing or over the cap, so no retry followed.
    retry_skipped: bool = False

    @property
    def served(self) -> bool:
        return self.status == 200

    @property
    def refused_on_arrival(self) -> bool:
        if self.status != 429:
            return False
        limit = self.deadline if self.deadline is not None else 600.0
        return self.done_at - self.sent_at < _ARRIVAL_SHARE * max(limit, 1.0)

    @property
    def given_up_in_queue(self) -> bool:
        """Queued, then refused (its deadline passed, or it was shed as hopeless)."""
        return self.status == 429 and not self.refused_on_arrival

    @property
    def ttfb(self) -> float | None:
        return None if self.headers_at is None else self.headers_at - self.sent_at


def flex_requests(seed: int, label: str, count: int, lengths: LengthMix,
                  deadlines: Sequence[float], first_index: int = 0) -> list[FlexRequest]:
    """``count`` seeded flex requests, deadlines drawn evenly from ``deadlines``."""
    rng = random.Random(f"{seed}-waits-{label}")
    out = []
    for index in range(first_index, first_index + count):
        prompt, output = lengths.draw(rng)
        job = Job(index, 0.0, prompt, output, seed=rng.randrange(1 << 30))
        out.append(FlexRequest(index, job, rng.choice(list(deadlines)),
                               "probe" if index % 2 == 0 else "retry"))
    return out


async def run_request(session: aiohttp.ClientSession, target: Target, request: FlexRequest, *,
                      max_retries: int, retry_cap: float) -> list[Attempt]:
    """The first send of ``request`` and its follow-ups; failures are recorded, never raised."""
    attempt = await _attempt(session, target, request, "first", request.deadline)
    attempts = [attempt]
    if not attempt.refused_on_arrival:
        return attempts
    if request.follow_up == "probe":
        attempts.append(await _attempt(session, target, request, "probe", None, attempt.refusal_place))
        return attempts
    for _ in range(max_retries):
        if attempt.retry_after is None or attempt.retry_after > retry_cap:
            attempt.retry_skipped = True
            break
        await asyncio.sleep(attempt.retry_after)
        attempt = await _attempt(session, target, request, "retry", request.deadline, attempt.refusal_place)
        attempts.append(attempt)
        if not attempt.refused_on_arrival:
            break
    return attempts


async def _attempt(session: aiohttp.ClientSession, target: Target, request: FlexRequest,
                   kind: str, deadline: float | None, place: str | None = None) -> Attempt:
    """One send, after reading the status (for the ``place`` a refusal held, if any)."""
    attempt = Attempt(request.index, kind, deadline)
    await _read_status(session, target, deadline, attempt, place)
    headers = target.headers()
    if deadline is not None:
        headers["X-Flex-Max-Wait"] = f"{deadline:g}"
    if attempt.status_place is not None:
        headers["X-Flex-Place"] = attempt.status_place
    body = orjson.dumps({
        "model": target.model,
        "messages": messages_for(request.job, real_text=target.real_text),
        "max_tokens": request.job.output_tokens,
        "seed": request.job.seed,
        "stream": True,
        "service_tier": "flex",
    })
    attempt.sent_at = time.monotonic()
    try:
        async with session.post(f"{target.url}/v1/chat/completions", data=body,
                                headers=headers) as response:
            attempt.headers_at = time.monotonic()
            attempt.status = response.status
            attempt.request_id = response.headers.get("x-request-id")
            attempt.header_estimate = _seconds(response.headers.get(ESTIMATE_HEADER))
            attempt.retry_after = _seconds(response.headers.get("Retry-After"))
            attempt.refusal_place = response.headers.get("x-flex-place")
            if response.status == 200:
                tail = b""
                async for data in response.content.iter_any():
                    tail = (tail + data)[-64:]
                attempt.completed = b"data: [DONE]" in tail
                if not attempt.completed:
                    attempt.error = "stream ended without [DONE]"
            else:
                payload = await response.read()
                attempt.error = payload[:300].decode("utf-8", "replace")
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                    attempt.code = orjson.loads(payload)["error"]["code"]
    except (TimeoutError, aiohttp.ClientError) as exc:
        attempt.error = f"{type(exc).__name__}: {exc}"
    attempt.done_at = time.monotonic()
    return attempt


async def _read_status(session: aiohttp.ClientSession, target: Target, deadline: float | None,
                       attempt: Attempt, place: str | None) -> None:
    """What ``/v1/flex/status`` tells this client for its model, deadline and held place."""
    params = {"model": target.model}
    if deadline is not None:
        params["max_wait"] = f"{deadline:g}"
    if place is not None:
        params["place"] = place
    try:
        async with session.get(f"{target.url}/v1/flex/status", params=params,
                               headers=target.headers()) as response:
            data = orjson.loads(await response.read())
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError):
        return
    for entry in data.get("data", ()):
        if entry.get("model") == target.model:
            attempt.status_estimate = _number(entry.get("estimated_wait_seconds"))
            attempt.status_has_p90 = "estimated_wait_p90_seconds" in entry
            attempt.status_p90 = _number(entry.get("estimated_wait_p90_seconds"))
            place = entry.get("place")
            attempt.status_place = place if isinstance(place, str) else None
            accepting = entry.get("accepting")
            attempt.status_accepting = accepting if isinstance(accepting, bool) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _seconds(raw: str | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class LoadSample:
    """One reading of the engine's and the gateway's load."""

    at: float
    # Sequences in the engine's running batch, and its output tokens so far.
    running: float
    generation_tokens: float
    # Flex requests waiting in the gateway's queue.
    flex_waiting: float


@dataclass(slots=True)
class Sampler:
    """Load readings, taken every ``interval`` until ``stopping``."""

    interval: float
    samples: list[LoadSample] = field(default_factory=list)
    stopping: bool = False


async def sample_load(session: aiohttp.ClientSession, engine_metrics: str, gateway_metrics: str,
                      sampler: Sampler) -> None:
    """Read both servers' metrics every ``sampler.interval`` seconds.

    They are other processes with no event to wait on, so this polls.
    """
    while not sampler.stopping:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            engine = await scrape(session, engine_metrics)
            gateway = await scrape(session, gateway_metrics)
            sampler.samples.append(LoadSample(
                time.monotonic(), engine.get("vllm:num_requests_running", 0.0),
                engine.get("vllm:generation_tokens_total", 0.0),
                gateway.get("flexserve_queue_depth|tier=flex", 0.0)))
        await asyncio.sleep(sampler.interval)


def fill_from_ledger(db_path: Path, attempts: Sequence[Attempt]) -> int:
    """Set each served attempt's ``queue_time`` from its ledger row; return how many matched."""
    wanted = {a.request_id: a for a in attempts if a.served and a.request_id}
    if not wanted:
        return 0
    matched = 0
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        ids = list(wanted)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for request_id, queue_ms in db.execute(
                    f"SELECT request_id, queue_time_ms FROM usage_records "  # noqa: S608
                    f"WHERE request_id IN ({marks})", chunk):
                wanted[request_id].queue_time = queue_ms / 1000
                matched += 1
    return matched
