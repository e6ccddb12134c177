"""One window of traffic through the real scheduler and the sim engine, on
the virtual clock: default requests arriving at a rate, a flex backlog that
never runs dry (closed-loop clients), and what each got.

The flex backlog is as deep as flex can use: what flex completes is the
harvest, the flex output a fleet can sell at that default load. Default's
latency is measured as a client sees it from the scheduler's stream:
TTFT from arrival to the first token, TPOT as the mean gap between the rest.
Only what happens in ``[warmup, warmup + duration)`` is counted: requests
that arrive in it, and flex tokens generated in it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flexserve.bench.traffic import FLEX_LENGTHS, SHAREGPT_LENGTHS, Job, LengthMix, messages_for
from flexserve.engines.base import EngineRequest
from flexserve.engines.sim import SimEngine, SimProfile
from flexserve.errors import FlexServeError
from flexserve.plan import clock
from flexserve.scheduler.policy import SchedulerConfig
from flexserve.scheduler.scheduler import Scheduler, Ticket
from flexserve.stats import percentile
from flexserve.tiers import ServiceTier

# Longest a refused flex client waits before it asks again, seconds.
MAX_RETRY_AFTER = 60.0
# Draws (prompt tokens, output tokens) for one request.
LengthDraw = Callable[[random.Random], tuple[int, int]]


@dataclass(frozen=True)
class Replica:
    """One engine replica as the sim engine models it."""

    profile: str | SimProfile = "h100-llama3-8b"  # a sim profile's name, or one fitted (fit.py)
    max_num_seqs: int = 256
    cost_model: str = "flat"
    kv_tokens: int | None = None
    prefix_caching: bool = False
    # Tokens between two wake-ups of a request's reader (vLLM's --stream-interval):
    # fewer wake-ups, a faster plan; first tokens and ends are told at once.
    stream_interval: int = 16
    # Where a fitted profile's costs come from, for the report.
    calibration: str = ""

    @property
    def profile_name(self) -> str:
        return self.profile if isinstance(self.profile, str) else self.profile.name


@dataclass(frozen=True)
class Window:
    """What one simulated window sends to one replica."""

    replica: Replica
    default_rate: float  # requests per (simulated) second
    duration: float = 60.0
    warmup: float = 10.0
    flex_clients: int = 64
    seed: int = 0
    default_lengths: LengthMix | LengthDraw = SHAREGPT_LENGTHS
    flex_lengths: LengthMix | LengthDraw = FLEX_LENGTHS
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def with_rate(self, rate: float) -> Window:
        return dataclasses.replace(self, default_rate=rate)


@dataclass
class Outcome:
    """What one window measured, per simulated second of it."""

    window: Window
    default_requests: int = 0
    default_ttft: list[float] = field(default_factory=list)  # seconds, each request's
    default_tpot: list[float] = field(default_factory=list)
    # Tokens generated and prompt tokens sent, by tier, inside the window.
    output_tokens: dict[str, int] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    flex_refused: int = 0
    engine_busy_seconds: float = 0.0  # simulated seconds the engine spent in steps
    wall_seconds: float = 0.0  # what simulating the window cost

    def per_second(self, tokens: dict[str, int], tier: str) -> float:
        return tokens.get(tier, 0) / self.window.duration

    @property
    def flex_output_tps(self) -> float:
        return self.per_second(self.output_tokens, "flex")

    @property
    def default_output_tps(self) -> float:
        return self.per_second(self.output_tokens, "default")

    @property
    def busy_ratio(self) -> float:
        return self.engine_busy_seconds / self.window.duration

    def as_dict(self) -> dict[str, Any]:
        return {
            "default_rate": self.window.default_rate,
            "default_requests": self.default_requests,
            "default_ttft_p50_ms": ms(percentile(self.default_ttft, 50)),
            "default_ttft_p99_ms": ms(percentile(self.default_ttft, 99)),
            "default_tpot_p50_ms": ms(percentile(self.default_tpot, 50)),
            "default_tpot_p99_ms": ms(percentile(self.default_tpot, 99)),
            "output_tokens_per_second": {t: round(self.per_second(self.output_tokens, t), 1)
                                         for t in sorted(self.output_tokens)},
            "prompt_tokens_per_second": {t: round(self.per_second(self.prompt_tokens, t), 1)
                                         for t in sorted(self.prompt_tokens)},
            "flex_refused": self.flex_refused,
            "engine_busy_ratio": round(self.busy_ratio, 4),
            "wall_seconds": round(self.wall_seconds, 2),
        }


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds, to the hundredth, for reports."""
    return None if seconds is None else round(seconds * 1000, 2)


def _draw(lengths: LengthMix | LengthDraw, rng: random.Random) -> tuple[int, int]:
    return lengths.draw(rng) if isinstance(lengths, LengthMix) else lengths(rng)


def simulate(window: Window) -> Outcome:
    """Run ``window`` on the virtual clock; what it measured."""
    started = time.perf_counter()
    outcome = clock.run(_simulate(window))
    outcome.wall_seconds = time.perf_counter() - started
    return outcome


async def _simulate(window: Window) -> Outcome:
    spec = window.replica
    engine = SimEngine(spec.profile, max_num_seqs=spec.max_num_seqs, kv_tokens=spec.kv_tokens,
                       cost_model=spec.cost_model, enable_prefix_caching=spec.prefix_caching,
                       stream_interval=spec.stream_interval)
    scheduler = Scheduler.from_engines([engine], window.scheduler)
    await scheduler.start()
    [model] = list(scheduler.pools)
    outcome = Outcome(window)
    origin = time.monotonic()
    opens, closes = origin + window.warmup, origin + window.warmup + window.duration
    run = _Run(scheduler, model, outcome, opens, closes)
    busy_at_open = 0.0

    async def open_window() -> None:
        nonlocal busy_at_open
        await asyncio.sleep(window.warmup)
        busy_at_open = engine.model.busy_seconds

    opener = asyncio.create_task(open_window())
    flex = [asyncio.create_task(run.flex_client(i, window)) for i in range(window.flex_clients)]
    arrivals = random.Random(f"{window.seed}-default-arrivals")
    lengths = random.Random(f"{window.seed}-default-lengths")
    defaults = []
    at = origin + arrivals.expovariate(window.default_rate) if window.default_rate > 0 else closes
    index = 0
    while at < closes:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        prompt, output = _draw(window.default_lengths, lengths)
        job = Job(index, at - origin, prompt, output, seed=window.seed * 1_000_003 + index)
        defaults.append(asyncio.create_task(run.default(job, counted=at >= opens)))
        index += 1
        at += arrivals.expovariate(window.default_rate)
    await asyncio.sleep(max(0.0, closes - time.monotonic()))
    await opener
    outcome.engine_busy_seconds = engine.model.busy_seconds - busy_at_open
    run.closed = True
    for task in flex:
        task.cancel()
    await asyncio.gather(*flex, return_exceptions=True)
    await asyncio.gather(*defaults)  # the last ones finish, their latency counted
    await scheduler.close()
    await engine.close()
    return outcome


class _Run:
    """The requests of one window and what they measure."""

    def __init__(self, scheduler: Scheduler, model: str, outcome: Outcome, opens: float,
                 closes: float) -> None:
        self.scheduler = scheduler
        self.model = model
        self.outcome = outcome
        self.opens = opens
        self.closes = closes
        self.closed = False

    def _request(self, job: Job, tier: ServiceTier, name: str) -> tuple[Ticket, EngineRequest]:
        # Default streamed, flex not (as `flexserve bench tiers` sends them):
        # a flex run the scheduler aborts is then started again unseen.
        ticket = Ticket(request_id=name, model=self.model, tier=tier, org_id="plan",
                        prompt_tokens=job.prompt_tokens, cost_tokens=job.prompt_tokens + job.output_tokens,
                        stream=tier is ServiceTier.DEFAULT, enqueued_at=time.monotonic())
        body = {"model": self.model, "messages": messages_for(job, real_text=False),
                "max_tokens": job.output_tokens, "seed": job.seed, "stream": True}
        return ticket, EngineRequest(name, self.model, body)

    def _count(self, tier: str, prompt: int, tokens: int, now: float) -> None:
        if self.opens <= now < self.closes:
            output = self.outcome.output_tokens
            output[tier] = output.get(tier, 0) + tokens
            if prompt:
                sent = self.outcome.prompt_tokens
                sent[tier] = sent.get(tier, 0) + prompt

    async def default(self, job: Job, counted: bool) -> None:
        ticket, request = self._request(job, ServiceTier.DEFAULT, f"default-{job.index}")
        arrived = time.monotonic()
        first = last = None
        num = 0
        prompt = job.prompt_tokens
        async for delta in self.scheduler.stream(ticket, request):
            so_far = delta.usage.completion_tokens if delta.usage is not None else num + bool(delta.text)
            if so_far <= num:
                continue
            now = time.monotonic()
            first = now if first is None else first
            last = now
            self._count("default", prompt, so_far - num, now)
            num = so_far
            prompt = 0
        if counted and first is not None:
            self.outcome.default_requests += 1
            self.outcome.default_ttft.append(first - arrived)
            if num > 1 and last is not None:
                self.outcome.default_tpot.append((last - first) / (num - 1))

    async def flex_client(self, client: int, window: Window) -> None:
        rng = random.Random(f"{window.seed}-flex-{client}")
        index = 0
        while not self.closed:
            prompt, output = _draw(window.flex_lengths, rng)
            job = Job(index, 0.0, prompt, output, seed=(window.seed * 1_000_003 + client) * 7919 + index)
            ticket, request = self._request(job, ServiceTier.FLEX, f"flex-{client}-{index}")
            index += 1
            usage = None
            try:
                async for delta in self.scheduler.stream(ticket, request):
                    usage = delta.usage or usage
                # Counted when done, as a client counts a finished request.
                if usage is not None:
                    self._count("flex", usage.prompt_tokens, usage.completion_tokens, time.monotonic())
            except FlexServeError as exc:
                # Refused (429): it comes back when told (Retry-After), as
                # `flexserve run` and the OpenAI SDK do, at most a minute on.
                if self.opens <= time.monotonic() < self.closes:
                    self.outcome.flex_refused += 1
                await asyncio.sleep(min(MAX_RETRY_AFTER, max(0.1, getattr(exc, "retry_after", 1.0))))

