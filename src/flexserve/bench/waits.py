"""``flexserve bench waits``: do flex wait estimates and Retry-After hold?

A sim engine and a FlexServe gateway in front of it (``--engine upstream``),
each its own process on loopback. First the engine's capacity: a saturating
flex backlog straight to it, its output tokens/s (as ``bench tiers`` D).
Then, through the gateway, default traffic at ``load`` (40 %) of that
capacity runs for the whole run (Poisson arrivals, ShareGPT-like lengths,
``bench/traffic.py``), and three flex scenarios follow one another, each
after the previous one has drained and a quiet gap:

- **cold**: no flex before; a sequential burst (requests sent one after the
  other at ``burst_rate`` a second);
- **trickle-burst**: a steady trickle of flex, then a sequential burst;
- **parallel**: ``parallel_burst`` flex requests sent at once.

Every flex request carries a deadline (``X-Flex-Max-Wait``) drawn evenly
from ``deadlines``; what each client does and measures is in
``bench/waits_load.py``, the figures in ``bench/waits_report.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from flexserve.bench.processes import (
    BenchError,
    raise_nofile_limit,
    start_gateway,
    start_sim_engine,
)
from flexserve.bench.report import host_info, percentile
from flexserve.bench.tiers import check_settings
from flexserve.bench.tiers_load import FlexLoop, Outcome, Target, flex_client, scrape, send_job
from flexserve.bench.traffic import (
    FLEX_LENGTHS,
    SHAREGPT_LENGTHS,
    LengthMix,
    default_schedule,
    flex_jobs,
)
from flexserve.bench.waits_load import (
    Attempt,
    FlexRequest,
    LoadSample,
    Sampler,
    fill_from_ledger,
    flex_requests,
    run_request,
    sample_load,
)
from flexserve.bench.waits_report import GOALS, format_report, scenario_figures
from flexserve.engines.sim.profiles import PROFILES

__all__ = ["QUICK", "WaitsOptions", "command_line", "format_report", "run_waits"]

# Longest the default traffic's schedule runs (seconds); the run ends well before.
_DEFAULT_HORIZON = 3600.0


@dataclass(frozen=True)
class WaitsOptions:
    """How ``bench waits`` runs (see ``flexserve bench waits --help``)."""

    seed: int = 0
    profile: str = "h100-llama3-8b"
    speed: float = 1.0
    # The sim engine's batch, and the gateway's upstream capacity.
    max_num_seqs: int = 32
    # Default traffic as a fraction of the engine's measured output tokens/s.
    load: float = 0.4
    # Seconds of the saturating backlog that measures the engine's capacity.
    capacity_seconds: float = 15.0
    # Seconds of default traffic alone before the first scenario.
    warmup: float = 10.0
    # Quiet seconds (default traffic only) between scenarios.
    gap: float = 30.0
    cold_burst: int = 300
    # Requests a second of a sequential burst.
    burst_rate: float = 50.0
    trickle_seconds: float = 60.0
    trickle_rate: float = 0.5
    sequential_burst: int = 300
    parallel_burst: int = 600
    # X-Flex-Max-Wait values, drawn evenly.
    deadlines: tuple[float, ...] = (1.0, 5.0, 20.0, 60.0, 180.0, 600.0)
    max_retries: int = 3
    # A Retry-After longer than this is not waited for (the run would not end).
    retry_cap: float = 120.0
    tolerance: float = 0.25
    # Seconds: the tolerance of an estimate near zero (as the gateway's own accuracy metric).
    tolerance_floor: float = 0.1
    # Longest output of any request (tokens); None: the mixes' own.
    max_output: int | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    # The `src` folder of another FlexServe tree to run the gateway from; None: this one.
    gateway_src: Path | None = None
    out: Path = Path("reports/waits.json")
    log_dir: Path | None = None
    command: str = ""


QUICK = WaitsOptions(max_num_seqs=16, capacity_seconds=4.0, warmup=2.0, gap=2.0, cold_burst=40,
                     trickle_seconds=8.0, trickle_rate=1.0, sequential_burst=40,
                     parallel_burst=80, retry_cap=15.0, max_output=48)


@dataclass
class _ScenarioRun:
    name: str
    description: str
    requests: list[FlexRequest]
    attempts: list[Attempt]
    began: float
    ended: float


def _mixes(opts: WaitsOptions) -> tuple[LengthMix, LengthMix]:
    if opts.max_output is None:
        return SHAREGPT_LENGTHS, FLEX_LENGTHS
    return SHAREGPT_LENGTHS.shortened(opts.max_output), FLEX_LENGTHS.shortened(opts.max_output)


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))


async def _capacity(engine_url: str, model: str, opts: WaitsOptions, flex_mix: LengthMix) -> float:
    """The engine's output tokens/s under a saturating flex backlog sent straight to it."""
    target = Target(engine_url, model, default_tier=None, flex_tier=None)
    metrics = f"{engine_url}/metrics"
    async with _session() as session:
        loop = FlexLoop(stream=True)
        tasks = [asyncio.create_task(flex_client(session, target,
                                                 flex_jobs(opts.seed, i, flex_mix), loop))
                 for i in range(2 * opts.max_num_seqs)]
        try:
            await asyncio.sleep(min(2.0, opts.capacity_seconds / 4))
            before, began = await scrape(session, metrics), time.monotonic()
            await asyncio.sleep(opts.capacity_seconds)
            after, ended = await scrape(session, metrics), time.monotonic()
        finally:
            loop.stopping = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    name = "vllm:generation_tokens_total"
    tps = (after.get(name, 0.0) - before.get(name, 0.0)) / (ended - began)
    if tps <= 0:
        raise BenchError("the engine produced no output tokens while its capacity was measured")
    return tps


async def _feed_defaults(session: aiohttp.ClientSession, target: Target, opts: WaitsOptions,
                         rate: float, mix: LengthMix, outcomes: list[Outcome]) -> None:
    """Default traffic on its seeded schedule until cancelled."""
    start = time.monotonic()
    pending: set[asyncio.Task[Outcome]] = set()

    def done(task: asyncio.Task[Outcome]) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is None:
            outcomes.append(task.result())

    try:
        for job in default_schedule(opts.seed, rate, _DEFAULT_HORIZON, mix):
            await asyncio.sleep(max(0.0, start + job.at - time.monotonic()))
            task = asyncio.create_task(send_job(session, target, job, "default", stream=True,
                                                scheduled_at=start + job.at))
            pending.add(task)
            task.add_done_callback(done)
    finally:
        for task in list(pending):
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _sequential(session: aiohttp.ClientSession, target: Target, opts: WaitsOptions,
                      requests: Sequence[FlexRequest], rate: float) -> list[Attempt]:
    """Send ``requests`` one after another at ``rate`` a second; all their attempts."""
    start = time.monotonic()
    tasks = []
    for number, request in enumerate(requests):
        await asyncio.sleep(max(0.0, start + number / rate - time.monotonic()))
        tasks.append(asyncio.create_task(run_request(
            session, target, request, max_retries=opts.max_retries, retry_cap=opts.retry_cap)))
    return [a for attempts in await asyncio.gather(*tasks) for a in attempts]


async def _parallel(session: aiohttp.ClientSession, target: Target, opts: WaitsOptions,
                    requests: Sequence[FlexRequest]) -> list[Attempt]:
    results = await asyncio.gather(*(
        run_request(session, target, r, max_retries=opts.max_retries, retry_cap=opts.retry_cap)
        for r in requests))
    return [a for attempts in results for a in attempts]


# A scenario's flex traffic: send it through a session to a target, return every attempt.
_Plan = Callable[[aiohttp.ClientSession, Target], Awaitable[list[Attempt]]]


def _plans(opts: WaitsOptions, mix: LengthMix) -> list[tuple[str, str, list[FlexRequest], _Plan]]:
    """The three scenarios in order: name, description, requests and how to send them."""
    cold = flex_requests(opts.seed, "cold", opts.cold_burst, mix, opts.deadlines)
    num_trickle = round(opts.trickle_seconds * opts.trickle_rate)
    trickle = flex_requests(opts.seed, "trickle", num_trickle, mix, opts.deadlines)
    burst = flex_requests(opts.seed, "burst", opts.sequential_burst, mix, opts.deadlines,
                          first_index=num_trickle)
    parallel = flex_requests(opts.seed, "parallel", opts.parallel_burst, mix, opts.deadlines)

    async def run_cold(session: aiohttp.ClientSession, target: Target) -> list[Attempt]:
        return await _sequential(session, target, opts, cold, opts.burst_rate)

    async def run_trickle_burst(session: aiohttp.ClientSession, target: Target) -> list[Attempt]:
        lead = asyncio.create_task(_sequential(session, target, opts, trickle, opts.trickle_rate))
        await asyncio.sleep(opts.trickle_seconds)
        rest = await _sequential(session, target, opts, burst, opts.burst_rate)
        return [*await lead, *rest]

    async def run_parallel(session: aiohttp.ClientSession, target: Target) -> list[Attempt]:
        return await _parallel(session, target, opts, parallel)

    return [
        ("cold", f"no flex before; {len(cold)} flex sent one after another at "
                 f"{opts.burst_rate:g}/s", cold, run_cold),
        ("trickle-burst", f"{num_trickle} flex over {opts.trickle_seconds:g} s, then "
                          f"{len(burst)} one after another at {opts.burst_rate:g}/s",
         [*trickle, *burst], run_trickle_burst),
        ("parallel", f"{len(parallel)} flex sent at once", parallel, run_parallel),
    ]


async def _drive(opts: WaitsOptions, target: Target, engine_url: str, default_rate: float,
                 default_mix: LengthMix, flex_mix: LengthMix,
                 ) -> tuple[list[_ScenarioRun], list[Outcome], list[LoadSample]]:
    defaults: list[Outcome] = []
    sampler = Sampler(interval=0.5)
    runs: list[_ScenarioRun] = []
    async with _session() as session:
        sampling = asyncio.create_task(sample_load(session, f"{engine_url}/metrics",
                                                   f"{target.url}/metrics", sampler))
        feeding = asyncio.create_task(_feed_defaults(session, target, opts, default_rate,
                                                     default_mix, defaults))
        try:
            await asyncio.sleep(opts.warmup)
            for number, (name, description, requests, plan) in enumerate(_plans(opts, flex_mix)):
                if number:
                    await asyncio.sleep(opts.gap)
                began = time.monotonic()
                attempts = await plan(session, target)
                runs.append(_ScenarioRun(name, description, requests, attempts, began,
                                         time.monotonic()))
                _progress(runs[-1])
        finally:
            sampler.stopping = True
            feeding.cancel()
            await asyncio.gather(feeding, sampling, return_exceptions=True)
    return runs, defaults, sampler.samples


def _progress(run: _ScenarioRun) -> None:
    firsts = [a for a in run.attempts if a.kind == "first"]
    print(f"scenario {run.name}: {len(firsts)} flex, {sum(a.served for a in firsts)} served at "
          f"once, {sum(a.refused_on_arrival for a in firsts)} refused, {len(run.attempts)} "
          f"attempts in {run.ended - run.began:.0f} s", flush=True,
          file=sys.stderr)


def _write_attempts(path: Path, runs: Sequence[_ScenarioRun]) -> None:
    """Every attempt and its request's deadline, one JSON line each, to recompute figures from."""
    with path.open("w") as out:
        for run in runs:
            deadlines = {r.index: r.deadline for r in run.requests}
            for attempt in run.attempts:
                row = {"scenario": run.name, "request_deadline": deadlines[attempt.request],
                       **{f.name: getattr(attempt, f.name) for f in dataclasses.fields(attempt)}}
                out.write(json.dumps(row) + "\n")


def _default_figures(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    ttfts = [o.ttft for o in outcomes if o.ok and o.ttft is not None]
    return {
        "sent": len(outcomes),
        "ok": sum(o.ok for o in outcomes),
        "ttft_ms_p50": round(percentile(ttfts, 50) * 1000, 1) if ttfts else None,
        "ttft_ms_p99": round(percentile(ttfts, 99) * 1000, 1) if ttfts else None,
    }


def _estimator_version(gateway_src: Path | None) -> str:
    """Which estimator the gateway ran: its tree's commit, and whether the
    scheduler had changes not yet committed."""
    if gateway_src is not None:
        return f"the gateway from {gateway_src}"
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        diff = subprocess.run(["git", "-C", str(root), "diff", "HEAD", "--",
                               "src/flexserve/scheduler"],
                              capture_output=True, check=False).stdout
    except OSError:
        return "unknown"
    if not commit:
        return "unknown"
    if not diff:
        return commit
    return f"{commit} + uncommitted scheduler changes (diff sha1 {hashlib.sha1(diff).hexdigest()[:10]})"


def run_waits(opts: WaitsOptions) -> dict[str, Any]:
    """Run the three scenarios, write nothing; return the report."""
    check_settings(opts.settings)
    raise_nofile_limit()
    default_mix, flex_mix = _mixes(opts)
    model = PROFILES[opts.profile].model_id if opts.profile in PROFILES else ""
    if not model:
        raise BenchError(f"unknown sim profile {opts.profile!r}; choose from {', '.join(PROFILES)}")
    with contextlib.ExitStack() as outer:
        if opts.log_dir is not None:
            log_dir = opts.log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = Path(outer.enter_context(tempfile.TemporaryDirectory(prefix="bench-waits-")))
        with ExitStack() as stack:
            engine = start_sim_engine(stack, log_dir, profile=opts.profile, speed=opts.speed,
                                      max_num_seqs=opts.max_num_seqs)
            capacity = asyncio.run(_capacity(engine.url, model, opts, flex_mix))
            default_rate = opts.load * capacity / default_mix.expected_output(opts.seed)
            gateway, key = start_gateway(stack, log_dir, engine.url, settings={
                "upstream_capacity": str(opts.max_num_seqs), **opts.settings},
                source=opts.gateway_src)
            target = Target(gateway.url, model, key)
            try:
                runs, defaults, samples = asyncio.run(_drive(
                    opts, target, engine.url, default_rate, default_mix, flex_mix))
            except (aiohttp.ClientError, OSError) as exc:
                for server in (engine, gateway):
                    if server.process.poll() is not None:
                        raise BenchError(f"{server.name} exited with status "
                                         f"{server.process.returncode}:\n{server.log_tail()}"
                                         ) from exc
                raise BenchError(repr(exc)) from exc
            gateway.stop()  # its usage writer flushes every row on the way out
            all_attempts = [a for run in runs for a in run.attempts]
            matched = fill_from_ledger(log_dir / "flexserve-home" / "flexserve.db", all_attempts)
            if opts.log_dir is not None:
                _write_attempts(log_dir / "attempts.jsonl", runs)
    scenarios = {
        run.name: {"description": run.description,
                   "seconds": round(run.ended - run.began, 1),
                   **scenario_figures(run.requests, run.attempts, samples, (run.began, run.ended),
                                      deadlines=opts.deadlines, max_num_seqs=opts.max_num_seqs,
                                      capacity_tps=capacity, tolerance=opts.tolerance,
                                      tolerance_floor=opts.tolerance_floor)}
        for run in runs
    }
    return {
        "benchmark": "waits",
        "command": opts.command,
        "host": host_info(),
        "estimator": _estimator_version(opts.gateway_src),
        "setup": {
            "profile": opts.profile, "speed": opts.speed, "max_num_seqs": opts.max_num_seqs,
            "capacity_output_tokens_per_s": round(capacity, 1),
            "load": opts.load, "default_rate_per_s": round(default_rate, 3),
            "default_lengths": default_mix.describe(), "flex_lengths": flex_mix.describe(),
            "deadlines_s": list(opts.deadlines), "tolerance": opts.tolerance,
            "tolerance_floor_s": opts.tolerance_floor, "max_retries": opts.max_retries,
            "retry_cap_s": opts.retry_cap, "gateway_settings": dict(opts.settings),
            "served_rows_matched_in_ledger": matched,
        },
        "goals": GOALS,
        "default": _default_figures(defaults),
        "scenarios": scenarios,
    }


def command_line(argv: Sequence[str]) -> str:
    """The command as typed, for the report."""
    return "flexserve " + " ".join(shlex.quote(a) for a in argv)


def with_changes(base: WaitsOptions, **changes: Any) -> WaitsOptions:
    """``base`` with the options given on the command line (None: keep)."""
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
