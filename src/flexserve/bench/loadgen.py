"""An open-loop load generator: requests leave on a schedule, whatever the answers do.

Arrivals are Poisson (exponential gaps) or evenly spaced at the phase's rate,
bounded by the phase's duration and a request count. Each request is its own
task, so a slow answer never holds back the next send (no coordinated
omission); ``send_lag`` records how late each send left against its schedule,
which shows when the generator itself could not keep up.

Per request it records the latency to the last byte and, for streams, the
time to the first body byte (an SSE gateway sends its headers with the first
token, so this is time to first token as a client sees it). One keep-alive
aiohttp session per target, so that targets never share a connection pool.
Run it on uvloop (``run_on_uvloop``): the generator's own cost is part of the
direct call's latency, the floor every overhead is measured against.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import aiohttp

_T = TypeVar("_T")

Arrivals = Literal["poisson", "fixed"]


@dataclass(frozen=True, slots=True)
class Target:
    """Where one kind of call goes."""

    name: str
    # The full URL of the chat completions endpoint.
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Phase:
    """One burst of open-loop load at one rate."""

    rate: float  # requests per second
    duration: float  # seconds of sending
    stream: bool
    arrivals: Arrivals = "poisson"
    max_requests: int = 1_000_000
    timeout: float = 30.0  # seconds one request may take
    seed: int | None = None


@dataclass(slots=True)
class PhaseResult:
    """What one phase measured against one target (times in seconds)."""

    target: str
    rate: float
    stream: bool
    latencies: list[float] = field(default_factory=list)  # to the last byte, 200s only
    ttfb: list[float] = field(default_factory=list)  # to the first body byte, streams only
    send_lags: list[float] = field(default_factory=list)  # actual send − scheduled send
    num_sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by kind: http_503, timeout…
    send_time: float = 0.0  # seconds from the first send to the last
    wall_time: float = 0.0  # seconds from the first send to the last answer

    @property
    def num_ok(self) -> int:
        return len(self.latencies)

    @property
    def num_errors(self) -> int:
        return sum(self.errors.values())

    def merge(self, other: PhaseResult) -> None:
        """Add another phase's samples (another round at the same rate)."""
        self.latencies += other.latencies
        self.ttfb += other.ttfb
        self.send_lags += other.send_lags
        self.num_sent += other.num_sent
        self.errors.update(other.errors)
        self.send_time += other.send_time
        self.wall_time += other.wall_time


class LoadGenerator:
    """Keeps one session per target; ``run`` sends one phase to one target."""

    def __init__(self, body: bytes, stream_body: bytes) -> None:
        self._bodies = {False: body, True: stream_body}
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, target: Target) -> aiohttp.ClientSession:
        session = self._sessions.get(target.name)
        if session is None:
            # Idle connections are dropped before uvicorn's own 5 s keep-alive ends
            # them, so that no request is sent on a connection the server is closing.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
            headers = {"Content-Type": "application/json", **target.headers}
            session = aiohttp.ClientSession(connector=connector, headers=headers)
            self._sessions[target.name] = session
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    async def run(self, target: Target, phase: Phase) -> PhaseResult:
        """Send ``phase`` to ``target`` and wait for every answer (or its timeout)."""
        session = self._session(target)
        body = self._bodies[phase.stream]
        result = PhaseResult(target.name, phase.rate, phase.stream)
        rng = random.Random(phase.seed)
        timeout = aiohttp.ClientTimeout(total=phase.timeout)
        tasks: set[asyncio.Task[None]] = set()
        clock = time.perf_counter
        start = clock()
        end = start + phase.duration
        scheduled = start
        while scheduled < end and result.num_sent < phase.max_requests:
            delay = scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            result.send_lags.append(clock() - scheduled)
            task = asyncio.create_task(
                _one(session, target.url, body, phase.stream, timeout, result)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            result.num_sent += 1
            scheduled += rng.expovariate(phase.rate) if phase.arrivals == "poisson" else 1 / phase.rate
        result.send_time = clock() - start
        if tasks:
            _, unfinished = await asyncio.wait(set(tasks), timeout=phase.timeout + 5)
            for task in unfinished:
                task.cancel()
                result.errors["unfinished"] += 1
        result.wall_time = clock() - start
        return result


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool,
    timeout: aiohttp.ClientTimeout, result: PhaseResult,
) -> None:
    clock = time.perf_counter
    started = clock()
    try:
        async with session.post(url, data=body, timeout=timeout) as response:
            if response.status != 200:
                await response.read()
                result.errors[f"http_{response.status}"] += 1
                return
            if stream:
                tail = await response.content.readany()
                first_byte = clock()
                while chunk := await response.content.readany():
                    tail = tail[-16:] + chunk
                if not tail.rstrip().endswith(b"[DONE]"):
                    result.errors["stream_without_done"] += 1
                    return
                result.ttfb.append(first_byte - started)
            else:
                await response.read()
        result.latencies.append(clock() - started)
    except TimeoutError:
        result.errors["timeout"] += 1
    except aiohttp.ClientOSError as exc:
        result.errors[f"ClientOSError(errno {exc.errno})"] += 1
    except aiohttp.ClientError as exc:
        result.errors[type(exc).__name__] += 1


def run_on_uvloop(main: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``main()`` to completion on a uvloop event loop (asyncio's on Windows)."""
    if sys.platform == "win32":
        factory = None
    else:
        import uvloop

        factory = uvloop.new_event_loop

    async def wrapped() -> _T:
        return await main()

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(wrapped())
