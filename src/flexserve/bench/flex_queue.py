"""What N flex requests waiting in the gateway's queue cost: memory and loop lag.

A sim engine (a timed profile, slowed down) sits behind a gateway whose
upstream capacity is tiny; long default-tier streams take that capacity, then
N flex requests with a long ``X-Flex-Max-Wait`` are opened at a steady pace
and left waiting, each holding its connection. Meanwhile:

- the gateway's RSS (and peak RSS) is read from ``/proc/PID/status``;
- its event loop's lag is measured *from outside*, as the latency of
  ``GET /healthz`` sent every ``probe_interval`` on one keep-alive connection,
  less the same latency measured on the idle gateway beforehand. The probe's
  own lateness (this process's loop) is reported beside it, so that a slow
  client is not mistaken for a slow gateway.

The queue depth is read from the gateway's ``/metrics``
(``flexserve_queue_depth``), so the report says how many were really waiting.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from flexserve.bench.loadgen import run_on_uvloop
from flexserve.bench.processes import (
    BenchError,
    Server,
    proc_status,
    raise_nofile_limit,
    start_gateway,
    start_sim_engine,
)
from flexserve.bench.report import format_table, host_info, summary_ms
from flexserve.engines.sim.profiles import PROFILES

_QUEUE_DEPTH = re.compile(rb'^flexserve_queue_depth\{[^}]*tier="flex"[^}]*\} ([0-9.e+]+)$', re.MULTILINE)
_PROFILE = "h100-llama3-8b"


@dataclass(frozen=True)
class FlexQueueConfig:
    """How the flex-queue benchmark runs (see ``flexserve bench flex-queue --help``)."""

    num_waiting: int = 10_000
    # Sequences the gateway runs on the engine at once; all taken by the long streams.
    capacity: int = 1
    # X-Flex-Max-Wait sent with each flex request, seconds.
    max_wait: float = 600.0
    # Flex connections opened per second.
    ramp_rate: float = 2_000.0
    # Seconds to measure while all of them wait.
    hold: float = 10.0
    # Seconds between two /healthz probes.
    probe_interval: float = 0.05
    # Seconds of idle probing before anything is sent, for the baseline.
    idle: float = 3.0
    # How slowly the sim engine runs the long streams (1.0: real time).
    sim_speed: float = 0.05
    # Tokens of each long stream holding the capacity.
    occupier_tokens: int = 2000


QUICK = FlexQueueConfig(num_waiting=200, ramp_rate=1_000, hold=1.0, idle=1.0, probe_interval=0.05)


@dataclass(slots=True)
class _Probe:
    """/healthz latencies, by stage, and how late each probe left."""

    latencies: dict[str, list[float]]
    client_lag: list[float]
    stage: str = "idle"


def run_flex_queue(config: FlexQueueConfig) -> dict[str, Any]:
    """Start the engine and gateway, hold the flex requests, and return the report."""
    nofile = raise_nofile_limit()
    if nofile < config.num_waiting + 1000:
        raise BenchError(f"open-files limit {nofile} is too low for {config.num_waiting} connections")
    with tempfile.TemporaryDirectory(prefix="flexserve-bench-") as tmp, ExitStack() as stack:
        log_dir = Path(tmp)
        sim = start_sim_engine(stack, log_dir, profile=_PROFILE, speed=config.sim_speed)
        gateway, key = start_gateway(
            stack, log_dir, sim.url, settings={"upstream_capacity": str(config.capacity)}
        )
        measured = run_on_uvloop(lambda: _hold(config, gateway, key))
    return {
        "benchmark": "flex-queue",
        "host": host_info(),
        "config": asdict(config),
        "open_files_limit": {"bench": nofile, "gateway": measured.pop("gateway_nofile")},
        **measured,
    }


async def _hold(config: FlexQueueConfig, gateway: Server, key: str) -> dict[str, Any]:
    model = PROFILES[_PROFILE].model_id
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    flex_body = orjson.dumps({
        "model": model, "service_tier": "flex", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Summarise this ticket."}],
    })
    occupier_body = orjson.dumps({
        "model": model, "service_tier": "default", "stream": True,
        "max_tokens": config.occupier_tokens,
        "messages": [{"role": "user", "content": "Write a very long story."}],
    })
    url = gateway.url + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    probe = _Probe({"idle": [], "ramp": [], "waiting": []}, [])
    answers: Counter[str] = Counter()
    rss: dict[str, dict[str, int]] = {}
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as probe_session:
        prober = asyncio.create_task(_probe_forever(probe_session, gateway.url, config, probe))
        await asyncio.sleep(config.idle)
        rss["idle"] = proc_status(gateway.pid)

        started_streams = [asyncio.Event() for _ in range(config.capacity)]
        occupiers = [asyncio.create_task(_occupy(session, url, occupier_body, event))
                     for event in started_streams]
        ready = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in started_streams)))
        watched: list[asyncio.Future[Any]] = [ready, *occupiers]
        done, _ = await asyncio.wait(watched, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            failed = [t.exception() for t in done if t.exception() is not None]
            raise BenchError(f"the long streams did not start: {failed or 'timed out'}")
        rss["occupied"] = proc_status(gateway.pid)

        probe.stage = "ramp"
        started = time.monotonic()
        waiters: list[asyncio.Task[None]] = []
        flex_headers = {"X-Flex-Max-Wait": f"{config.max_wait:g}"}
        for i in range(config.num_waiting):
            delay = started + i / config.ramp_rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            waiters.append(asyncio.create_task(
                _wait_for_answer(session, url, flex_body, flex_headers, answers)))
        depth = await _wait_for_depth(session, gateway.url, config.num_waiting, timeout=60.0)
        ramp_seconds = time.monotonic() - started

        probe.stage = "waiting"
        await asyncio.sleep(config.hold)
        rss["waiting"] = proc_status(gateway.pid)
        depth_after = await _queue_depth(session, gateway.url)
        prober.cancel()
        gateway_nofile = _soft_nofile(gateway.pid)
        for task in [*waiters, *occupiers]:
            task.cancel()
        await asyncio.gather(*waiters, *occupiers, return_exceptions=True)

    idle_p50 = summary_ms(probe.latencies["idle"])
    baseline = idle_p50["p50"] if idle_p50 else 0.0
    lag = [max(0.0, s - baseline / 1000) for s in probe.latencies["waiting"]]
    mib = {stage: round(status["VmRSS"] / 1024, 1) for stage, status in rss.items()}
    return {
        "num_waiting_reached": depth,
        "num_waiting_after_hold": depth_after,
        "ramp_seconds": round(ramp_seconds, 2),
        "answered_early": dict(answers),
        "rss_mib": {**mib, "peak": round(rss["waiting"]["VmHWM"] / 1024, 1)},
        "rss_per_waiter_kib": round((rss["waiting"]["VmRSS"] - rss["occupied"]["VmRSS"])
                                    / max(depth, 1), 2),
        "healthz_ms": {stage: summary_ms(values) for stage, values in probe.latencies.items()},
        "loop_lag_ms": summary_ms(lag),
        "probe_client_lag_ms": summary_ms(probe.client_lag),
        "gateway_nofile": gateway_nofile,
    }


async def _occupy(session: aiohttp.ClientSession, url: str, body: bytes,
                  first_byte: asyncio.Event) -> None:
    """Run one long stream to its end (or cancellation), setting ``first_byte`` when it starts."""
    async with session.post(url, data=body) as response:
        if response.status != 200:
            raise RuntimeError(f"occupying request answered HTTP {response.status}: "
                               f"{await response.text()}")
        await response.content.readany()
        first_byte.set()
        while await response.content.readany():
            pass


async def _wait_for_answer(session: aiohttp.ClientSession, url: str, body: bytes,
                           headers: dict[str, str], answers: Counter[str]) -> None:
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            answers[f"http_{response.status}"] += 1
    except aiohttp.ClientError as exc:
        answers[type(exc).__name__] += 1


async def _probe_forever(session: aiohttp.ClientSession, base_url: str, config: FlexQueueConfig,
                         probe: _Probe) -> None:
    loop = asyncio.get_running_loop()
    while True:
        wake_at = loop.time() + config.probe_interval
        await asyncio.sleep(config.probe_interval)
        # How late this process woke: a busy client, not a slow gateway.
        probe.client_lag.append(max(0.0, loop.time() - wake_at))
        stage = probe.stage
        started = time.perf_counter()
        async with session.get(base_url + "/healthz") as response:
            await response.read()
        probe.latencies[stage].append(time.perf_counter() - started)


async def _queue_depth(session: aiohttp.ClientSession, base_url: str) -> int:
    async with session.get(base_url + "/metrics") as response:
        text = await response.read()
    return int(sum(float(m) for m in _QUEUE_DEPTH.findall(text)))


async def _wait_for_depth(session: aiohttp.ClientSession, base_url: str, num: int,
                          timeout: float) -> int:
    """Poll the gateway's queue depth until ``num`` flex requests wait (or time is up)."""
    deadline = time.monotonic() + timeout
    depth = await _queue_depth(session, base_url)
    while depth < num and time.monotonic() < deadline:
        # The gateway's own metric is the only signal there is: poll it.
        await asyncio.sleep(0.25)
        depth = await _queue_depth(session, base_url)
    return depth


def _soft_nofile(pid: int) -> int | None:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                value = line.split()[3]
                return int(value) if value.isdigit() else None
    return None


def format_report(report: dict[str, Any]) -> str:
    """The short table printed after a run."""
    rows = []
    for stage in ("idle", "ramp", "waiting"):
        stats = report["healthz_ms"][stage] or {}
        rows.append((stage, stats.get("p50"), stats.get("p99"), stats.get("max")))
    lag = report["loop_lag_ms"] or {}
    lines = [
        (f"flex requests waiting: {report['num_waiting_reached']} "
         f"(after the hold: {report['num_waiting_after_hold']}; answered early: "
         f"{report['answered_early'] or 'none'})"),
        (f"gateway RSS: idle {report['rss_mib']['idle']} MiB, with the queue "
         f"{report['rss_mib']['waiting']} MiB (peak {report['rss_mib']['peak']} MiB), "
         f"{report['rss_per_waiter_kib']} KiB per waiting request"),
        format_table(("GET /healthz", "p50 ms", "p99 ms", "max ms"), rows),
        (f"loop lag while they wait (healthz latency over idle p50): p50 {lag.get('p50')} ms, "
         f"p99 {lag.get('p99')} ms, max {lag.get('max')} ms"),
        f"probe's own lateness: p99 {(report['probe_client_lag_ms'] or {}).get('p99')} ms",
    ]
    return "\n".join(lines)
