"""The load generator of ``flexserve bench tiers``: open-loop default, closed-loop flex.

Default requests are streamed and timed at the client (wall clock):
TTFT is from just before the request is sent to the first content token;
TPOT is ``(last token time - first token time) / (tokens - 1)`` with
``tokens`` the completion tokens of the stream's usage chunk. To keep a
two-core load generator cheap, SSE events are recognised by their bytes and
only the usage chunk is parsed as JSON.

Flex clients each send their jobs back to back (a closed loop), so that flex
always wants more than is spare. A 429 is counted and its ``Retry-After``
honoured up to one second, then the client moves to its next job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from flexserve.bench.traffic import Job, messages_for

__all__ = ["Outcome", "Target", "drain", "flex_client", "scrape", "send_job"]

_CONTENT = b'"content":"'
_EMPTY_CONTENT = b'"content":""'
_USAGE = b'"usage":{'
# Longest a client waits after a 429 before its next job (seconds).
_MAX_RETRY_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go and how they are dressed."""

    url: str  # base URL, without /v1
    model: str
    api_key: str = ""
    # Sent as `service_tier` for each kind of request; None: the field is left out.
    default_tier: str | None = "default"
    flex_tier: str | None = "flex"
    # Sent as `priority` (vLLM's field, lower first) when not None: for an engine
    # run with --scheduling-policy priority and no gateway in front.
    default_priority: int | None = None
    flex_priority: int | None = None
    real_text: bool = False

    def headers(self) -> dict[str, str]:
        out = {"Content-Type": "application/json"}
        if self.api_key:
            out["Authorization"] = f"Bearer {self.api_key}"
        return out


@dataclass(slots=True)
class Outcome:
    """What one request did, in wall-clock seconds on this process's monotonic clock."""

    kind: str  # "default" or "flex"
    index: int
    sent_at: float
    # How late the request left against its schedule (open loop only).
    lateness: float = 0.0
    status: int = 0
    done_at: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    retry_after: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.completion_tokens > 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def tpot(self) -> float | None:
        if self.first_token_at is None or self.last_token_at is None:
            return None
        if self.completion_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.completion_tokens - 1)


def _body(target: Target, job: Job, kind: str, stream: bool) -> bytes:
    tier = target.default_tier if kind == "default" else target.flex_tier
    priority = target.default_priority if kind == "default" else target.flex_priority
    payload: dict[str, Any] = {
        "model": target.model,
        "messages": messages_for(job, real_text=target.real_text),
        "max_tokens": job.output_tokens,
        "seed": job.seed,
        "stream": stream,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    if tier is not None:
        payload["service_tier"] = tier
    if priority is not None:
        payload["priority"] = priority
    return orjson.dumps(payload)


async def send_job(session: aiohttp.ClientSession, target: Target, job: Job, kind: str,
                   stream: bool, scheduled_at: float | None = None) -> Outcome:
    """Send one chat completion and time it; failures are recorded, never raised."""
    body = _body(target, job, kind, stream)
    outcome = Outcome(kind, job.index, time.monotonic())
    if scheduled_at is not None:
        outcome.lateness = max(0.0, outcome.sent_at - scheduled_at)
    try:
        async with session.post(f"{target.url}/v1/chat/completions", data=body,
                                headers=target.headers()) as response:
            outcome.status = response.status
            if response.status != 200:
                outcome.retry_after = _retry_after(response.headers)
                text = await response.read()
                outcome.error = text[:300].decode("utf-8", "replace")
            elif stream:
                await _read_stream(response, outcome)
            else:
                data = orjson.loads(await response.read())
                outcome.first_token_at = outcome.last_token_at = time.monotonic()
                _take_usage(data.get("usage"), outcome)
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.done_at = time.monotonic()
    return outcome


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("Retry-After")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _take_usage(usage: Any, outcome: Outcome) -> None:
    if isinstance(usage, dict):
        outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
        outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)


async def _read_stream(response: aiohttp.ClientResponse, outcome: Outcome) -> None:
    """Time the content events of an SSE stream and read its usage chunk."""
    pending = b""
    finished = False
    async for data in response.content.iter_any():
        now = time.monotonic()
        pending += data
        *events, pending = pending.split(b"\n\n")
        for event in events:
            if event.startswith(b"data: [DONE]"):
                finished = True
            elif event.startswith(b"event: error"):
                outcome.error = event[:300].decode("utf-8", "replace")
            elif _USAGE in event:
                _take_usage(orjson.loads(event[event.index(b"{"):]).get("usage"), outcome)
            elif _CONTENT in event and _EMPTY_CONTENT not in event:
                if outcome.first_token_at is None:
                    outcome.first_token_at = now
                outcome.last_token_at = now
    if not finished and outcome.error is None:
        outcome.error = "stream ended without [DONE]"


@dataclass(slots=True)
class FlexLoop:
    """The shared stop switch and the outcomes of a set of closed-loop flex clients."""

    stream: bool
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: bool = False


async def flex_client(session: aiohttp.ClientSession, target: Target, jobs: Iterator[Job],
                      loop: FlexLoop) -> None:
    """Send ``jobs`` back to back until ``loop.stopping`` (or cancellation)."""
    while not loop.stopping:
        outcome = await send_job(session, target, next(jobs), "flex", loop.stream)
        loop.outcomes.append(outcome)
        if outcome.status == 429:
            await asyncio.sleep(min(_MAX_RETRY_WAIT, outcome.retry_after or _MAX_RETRY_WAIT))
        elif not outcome.ok and not loop.stopping:
            await asyncio.sleep(0.2)  # a broken target must not be hammered in a tight loop


# The engine's histogram of tokens per step, whose buckets the tiers report keeps.
_STEP_BUCKETS = "vllm:iteration_tokens_total_bucket"


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """A Prometheus endpoint's samples, summed over labels by sample name.

    Histograms and counters keep their suffixes (``_total``, ``_sum``,
    ``_count``); bucket samples are left out. Samples whose name has a
    ``{tier="..."}``-style label are also summed per label value, as
    ``name|label=value``; the engine's step-size histogram keeps its buckets
    (``vllm:iteration_tokens_total_bucket|le=N``).
    """
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        text = await response.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == _STEP_BUCKETS:
                key = f"{sample.name}|le={sample.labels.get('le')}"
                out[key] = out.get(key, 0.0) + sample.value
                continue
            if sample.name.endswith("_bucket") or sample.name.endswith("_created"):
                continue
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
            for label, value in sample.labels.items():
                if label in ("tier", "status", "kind"):
                    key = f"{sample.name}|{label}={value}"
                    out[key] = out.get(key, 0.0) + sample.value
    return out


async def drain(session: aiohttp.ClientSession, metrics_url: str, busy_names: tuple[str, ...],
                timeout: float) -> bool:
    """Wait until the samples named ``busy_names`` all read 0; False on timeout.

    The servers are other processes with no event to wait on, so this polls.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            samples = await scrape(session, metrics_url)
            if all(samples.get(name, 0.0) == 0.0 for name in busy_names):
                return True
        await asyncio.sleep(0.2)
    return False
