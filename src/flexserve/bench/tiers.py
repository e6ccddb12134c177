"""``flexserve bench tiers``: default latency under a flex backlog, in one run.

Scenarios on the same seeded traffic (``bench/traffic.py``):

- D: a saturating flex backlog (closed loop) straight to the sim engine, no
  gateway: the engine's true maximum output tokens/s. Run first, because
- A: default alone, Poisson arrivals at ``load`` (0.4) of D's output tokens/s
  with ShareGPT-like lengths, streamed, through a FlexServe gateway;
- B: A's requests plus the flex backlog, through the same gateway;
- C: B through the same gateway with ``tiers_enabled=false`` (every tier FCFS,
  no flex headroom, no preemption): the damage that tiers prevent;
- F (sim only): A's requests plus a batch of the flex backlog's jobs, sent
  through the tiered gateway's Batch API: batch lines yield as flex does;
- E (sim only, an extra): B's traffic straight to the engine with vLLM's
  ``priority`` field, default before flex, no gateway: what the engine's own
  priority queue does alone, and the maximum for B's mix of lengths (D's
  flex-only mix has more prompt per output token, so it yields fewer output
  tokens per second than B's mix).

With ``engine="embedded"`` the gateway runs SmolLM2 itself; there is no
engine without a gateway, so D is the backlog through the tier-blind gateway.

Each server is its own process (``bench/processes.py``); the load generator
(``bench/tiers_load.py``) runs here; figures and the report's table come
from ``bench/tiers_report.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from flexserve.bench.processes import (
    BenchError,
    Server,
    create_key,
    flexserve_command,
    free_port,
    raise_nofile_limit,
    start_server,
)
from flexserve.bench.report import host_info
from flexserve.bench.tiers_batch import start_backlog, stop_backlog
from flexserve.bench.tiers_load import (
    FlexLoop,
    Outcome,
    Target,
    drain,
    flex_client,
    scrape,
    send_job,
)
from flexserve.bench.tiers_plots import write_plots
from flexserve.bench.tiers_report import (
    Window,
    disturbances,
    format_table,
    goal_ratios,
    summarize,
)
from flexserve.bench.traffic import (
    EMBEDDED_DEFAULT,
    EMBEDDED_FLEX,
    FLEX_LENGTHS,
    SHAREGPT_LENGTHS,
    Job,
    LengthMix,
    default_schedule,
    flex_jobs,
)
from flexserve.config import Settings

__all__ = ["TiersOptions", "run_tiers"]

_SIM_BUSY = ("vllm:num_requests_running", "vllm:num_requests_waiting")
_GATEWAY_BUSY = ("flexserve_in_flight", "flexserve_queue_depth")
# Longest output of a --quick run (tokens).
_QUICK_MAX_OUTPUT = 48


@dataclass(frozen=True)
class TiersOptions:
    """Everything one ``bench tiers`` run needs; the CLI fills it in."""

    engine: str = "sim"
    duration: float = 60.0
    warmup: float | None = None
    seed: int = 0
    profile: str = "h100-llama3-8b"
    speed: float = 1.0
    max_num_seqs: int = 32
    # Sim engine's step token budget (vLLM's --max-num-batched-tokens); None: the profile's.
    max_num_batched_tokens: int | None = None
    # Sim engine's KV cache in tokens (sim-engine --kv-tokens); None: the profile's.
    kv_tokens: int | None = None
    # Sim engine's step-time cost model (flat, calibrated), and the gateways' predictions'.
    cost_model: str = "flat"
    flex_clients: int | None = None
    load: float = 0.4
    settings: Mapping[str, str] = field(default_factory=dict)
    # Sim only: more B scenarios (B1, B2, ...), each with these settings on top of ``settings``.
    variants: Sequence[Mapping[str, str]] = ()
    # Sim only: pieces of this many tokens for scenario B-split (B with the
    # gateway's split prefill); the sim engine then caches prefixes in every
    # scenario. 0: no B-split, no prefix cache.
    split_prefill: int = 0
    # Sim only: scenario P, E's traffic on a sim engine with the flex-aware
    # step policy letting flex prefill this many tokens a step (0: no P).
    engine_policy: int = 0
    # Contrast scenarios to leave out ("C", "E").
    skip: frozenset[str] = frozenset()
    out: Path = Path("reports/bench-tiers.json")
    quick: bool = False
    log_dir: Path | None = None
    command: str = ""
    # Sim only: a fleet of this many gateways in front of this many engines,
    # against one in front of one (``bench/tiers_fleet.py``), sharing this
    # Redis (None: a throwaway redis-server) and database (None: a SQLite file).
    gateways: int = 1
    engines: int = 1
    redis: str | None = None
    db: str | None = None

    @property
    def fleet(self) -> bool:
        return self.gateways > 1 or self.engines > 1

    @property
    def warmup_seconds(self) -> float:
        if self.warmup is not None:
            return self.warmup
        if self.quick:
            return 5.0 if self.engine == "embedded" else 0.5
        return min(10.0, max(2.0, 0.1 * self.duration))

    @property
    def num_flex_clients(self) -> int:
        """Closed-loop flex clients: twice the sequences the engine runs at once."""
        if self.flex_clients is not None:
            return self.flex_clients
        if self.engine == "embedded":
            return 2 * int(self.settings.get("embedded_slots", "4"))
        return 2 * self.max_num_seqs

    @property
    def default_wait(self) -> float:
        """Seconds to let default requests sent in the window finish after it."""
        if self.quick:
            return 10.0 if self.engine == "embedded" else 3.0
        return max(60.0, self.duration)


def mixes(opts: TiersOptions, default: LengthMix, flex: LengthMix) -> tuple[LengthMix, LengthMix]:
    """The length mixes of a run; a smoke run clips outputs so that its requests end quickly."""
    if not opts.quick:
        return default, flex
    return default.shortened(_QUICK_MAX_OUTPUT), flex.shortened(_QUICK_MAX_OUTPUT)


@dataclass
class Scenario:
    """One scenario to run: where to send, what to send, what to read."""

    name: str
    description: str
    # Where requests go: in turn to each (several gateways, or engines).
    targets: Sequence[Target]
    defaults: Sequence[Job]
    num_flex: int
    flex_stream: bool
    # Prometheus endpoints, summed: every engine's, every gateway's.
    engine_metrics: Sequence[str]
    gateway_metrics: Sequence[str]
    token_counter: str
    # Lines of a batch backlog sent through the gateway's Batch API (scenario F).
    batch_jobs: Sequence[Job] = ()
    # Sequences each engine runs at once (the gateways' upstream capacity).
    engine_capacity: int = 0

    def target(self, number: int) -> Target:
        return self.targets[number % len(self.targets)]


def tiers_enabled_available() -> bool:
    """True once the gateway has the tier-blind switch (the tiered scheduler landed)."""
    return any(f.name == "tiers_enabled" for f in dataclasses.fields(Settings))


def check_settings(settings: Mapping[str, str]) -> None:
    """Refuse ``--set`` names the gateway does not know (they would be ignored silently)."""
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise BenchError(f"unknown gateway setting(s): {', '.join(unknown)}")


async def _drive(sc: Scenario, opts: TiersOptions,
                        flex_lengths: LengthMix) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    began = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = FlexLoop(stream=sc.flex_stream)
        flex_tasks = [
            asyncio.create_task(flex_client(session, sc.target(i),
                                            flex_jobs(opts.seed, i, flex_lengths), loop))
            for i in range(sc.num_flex)
        ]
        backlog = await start_backlog(session, sc.target(0), sc.batch_jobs) if sc.batch_jobs else None
        watching = asyncio.Event()
        watch = asyncio.create_task(_watch_engines(session, sc.engine_metrics, watching))
        try:
            if flex_tasks or backlog is not None:
                await asyncio.sleep(opts.warmup_seconds)
            window, defaults = await _measure(session, sc, opts)
        finally:
            watching.set()
            loop.stopping = True
            for task in flex_tasks:
                task.cancel()
            await asyncio.gather(*flex_tasks, return_exceptions=True)
            if backlog is not None:
                await stop_backlog(session, sc.target(0), backlog)
        most = await watch
        drained_at = time.monotonic()
        busy = _SIM_BUSY if sc.engine_metrics else _GATEWAY_BUSY
        for busy_url in sc.engine_metrics or sc.gateway_metrics:
            if not await drain(session, busy_url, busy, timeout=60.0):
                print(f"warning: scenario {sc.name}: {busy_url} did not drain in 60 s",
                      file=sys.stderr)
    result = summarize(sc.name, sc.description, window, defaults, len(sc.defaults), loop.outcomes)
    if sc.engine_metrics:
        # Running + waiting in each engine, at its most: past the capacity,
        # the gateways sent it more than it runs at once.
        result["engine_sequences_max"] = most
        result["engine_capacity"] = sc.engine_capacity
    if backlog is not None:
        result["batch_lines"] = backlog.num_lines
        result["batch_completed"] = backlog.completed_at_end
    result["host_load_1m"] = {"start": load_start, "end": round(os.getloadavg()[0], 2)}
    result["disturbed"] = disturbances(result)
    result["seconds"] = {"total": round(time.monotonic() - began, 1),
                         "after_window": round(drained_at - window.end, 1),
                         "drain": round(time.monotonic() - drained_at, 1)}
    return result


def run_scenario(sc: Scenario, opts: TiersOptions, flex_mix: LengthMix,
         servers: Sequence[Server]) -> dict[str, Any]:
    """Run one scenario; a server that died on the way fails the run with its log's tail."""
    cpu_before = {server.name: _cpu_seconds(server.pid) for server in servers}
    own_before, wall_before = time.process_time(), time.monotonic()
    print(f"scenario {sc.name}: started ({sc.description}); about "
          f"{opts.warmup_seconds + opts.duration:.0f} s of traffic, then a drain", file=sys.stderr)
    try:
        result = asyncio.run(_drive(sc, opts, flex_mix))
    except (aiohttp.ClientError, OSError) as exc:
        for server in servers:
            if server.process.poll() is not None:
                raise BenchError(f"scenario {sc.name}: {server.name} exited with status "
                                 f"{server.process.returncode}:\n{server.log_tail()}") from exc
        raise BenchError(f"scenario {sc.name}: {exc!r}") from exc
    wall = time.monotonic() - wall_before
    cpu = {server.name: (_cpu_seconds(server.pid) - cpu_before[server.name]) / wall * 100
           for server in servers}
    cpu["load-generator"] = (time.process_time() - own_before) / wall * 100
    # Each process's CPU over the whole scenario (warm-up, window, wait): % of one core.
    result["cpu_percent"] = {name: round(value, 1) for name, value in cpu.items()}
    _progress(result)
    return result


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _scrape_all(session: aiohttp.ClientSession, urls: Sequence[str]) -> dict[str, float]:
    """The samples of every endpoint in ``urls``, summed by name."""
    total: dict[str, float] = {}
    for samples in await asyncio.gather(*(scrape(session, url) for url in urls)):
        for name, value in samples.items():
            total[name] = total.get(name, 0.0) + value
    return total


async def _watch_engines(session: aiohttp.ClientSession, urls: Sequence[str],
                         done: asyncio.Event) -> int:
    """Until ``done``, read every engine's running and waiting sequences
    every 0.25 s; return the most any one engine held (0 if never read)."""
    most = 0
    while urls and not done.is_set():
        readings = await asyncio.gather(*(scrape(session, url) for url in urls),
                                        return_exceptions=True)
        for samples in readings:
            if isinstance(samples, dict):
                most = max(most, int(sum(samples.get(name, 0.0) for name in _SIM_BUSY)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 0.25)
    return most


async def _measure(session: aiohttp.ClientSession, sc: Scenario,
                   opts: TiersOptions) -> tuple[Window, list[Outcome]]:
    """The measured window: default jobs on schedule; then wait for them to finish."""
    engine_before = await _scrape_all(session, sc.engine_metrics)
    gateway_before = await _scrape_all(session, sc.gateway_metrics)
    start = time.monotonic()
    tasks = [asyncio.create_task(_send_at(session, sc.target(number), job, start + job.at))
             for number, job in enumerate(sc.defaults)]
    await asyncio.sleep(max(0.0, start + opts.duration - time.monotonic()))
    engine_after = await _scrape_all(session, sc.engine_metrics)
    gateway_after = await _scrape_all(session, sc.gateway_metrics)
    end = time.monotonic()
    speed = opts.speed if opts.engine == "sim" else 1.0
    counter = ("vllm:generation_tokens_total" if sc.engine_metrics
               else "flexserve_tokens_total|kind=completion")
    window = Window(start, end, speed, engine_before, engine_after, gateway_before,
                    gateway_after, counter)
    defaults: list[Outcome] = []
    if tasks:
        finished, pending = await asyncio.wait(tasks, timeout=opts.default_wait)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        defaults = [t.result() for t in finished]
    return window, defaults


async def _send_at(session: aiohttp.ClientSession, target: Target, job: Job,
                   when: float) -> Outcome:
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    return await send_job(session, target, job, "default", stream=True, scheduled_at=when)


def model_id(url: str, api_key: str = "") -> str:
    async def fetch() -> str:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with aiohttp.ClientSession() as session, session.get(
                f"{url}/v1/models", headers=headers) as response:
            data = await response.json()
        return str(data["data"][0]["id"])
    return asyncio.run(fetch())


def start_sim_engine(stack: ExitStack, log_dir: Path, opts: TiersOptions,
                     name: str = "sim-engine", *extra: str) -> Server:
    port = free_port()
    argv = flexserve_command(
        "sim-engine", "--port", str(port), "--profile", opts.profile, "--speed", str(opts.speed),
        "--max-num-seqs", str(opts.max_num_seqs), "--scheduling-policy", "priority",
        "--cost-model", opts.cost_model, *extra,
        *(("--enable-prefix-caching",) if opts.split_prefill else ()),
        *(("--max-num-batched-tokens", str(opts.max_num_batched_tokens))
          if opts.max_num_batched_tokens else ()),
        *(("--kv-tokens", str(opts.kv_tokens)) if opts.kv_tokens else ()),
        # Its own times and steps, read by `bench prefill-waits`, where the logs are kept.
        *(("--log-requests", "--log-steps") if opts.log_dir else ()),
    )
    return start_server(stack, name, argv, port, "/health", log_dir)


def start_gateway(stack: ExitStack, log_dir: Path, home: Path, opts: TiersOptions, *,
                  tiers: bool, upstreams: Sequence[str], variant: Mapping[str, str] | None = None,
                  name: str | None = None, db_url: str | None = None,
                  redis: str | None = None) -> Server:
    """``flexserve serve`` in front of ``upstreams`` (none: the embedded
    engine), on ``db_url`` (default: a SQLite file in ``home``), sharing
    state with other gateways through ``redis`` if given."""
    port = free_port()
    env: dict[str, str | None] = {
        "FLEXSERVE_BOOTSTRAP_DEMO": "false",
        "FLEXSERVE_LOG_LEVEL": "warning",
        "FLEXSERVE_TIERS_ENABLED": "true" if tiers else "false",
        "FLEXSERVE_SIM_COST_MODEL": opts.cost_model,
    }
    # Batch lines in flight (scenario F): as many as B's closed-loop flex clients.
    env["FLEXSERVE_BATCH_WINDOW"] = str(opts.num_flex_clients)
    if upstreams:
        env["FLEXSERVE_UPSTREAM_CAPACITY"] = str(opts.max_num_seqs)
        env["FLEXSERVE_UPSTREAM_PRIORITY_HINT"] = "true"
        engine_args = ["--engine", "upstream"]
        for upstream in upstreams:
            engine_args += ["--upstream", upstream]
    else:
        engine_args = ["--engine", "embedded"]
    if redis is not None:
        env["FLEXSERVE_REDIS"] = redis
    settings = {**opts.settings, **(variant or {})}
    env.update({"FLEXSERVE_" + key.upper(): value for key, value in settings.items()})
    argv = flexserve_command("serve", *engine_args, "--port", str(port), "--home", str(home),
                             "--db", db_url or db_url_in(home))
    name = name or f"gateway-{'tiers' if tiers else 'fcfs'}"
    return start_server(stack, name, argv, port, "/healthz", log_dir, env)


def db_url_in(home: Path) -> str:
    return f"sqlite:///{home / 'flexserve.db'}"


def rate_for(opts: TiersOptions, max_tps_engine: float, lengths: LengthMix) -> tuple[float, float]:
    """Default arrivals per second (engine time, wall time) at ``load`` of the maximum."""
    if max_tps_engine <= 0:
        raise BenchError("scenario D produced no output tokens in its window, so there is no "
                         "maximum to set the default rate from: give a longer --duration")
    per_engine_second = opts.load * max_tps_engine / lengths.expected_output(opts.seed)
    speed = opts.speed if opts.engine == "sim" else 1.0
    return per_engine_second, per_engine_second * speed


def _run_sim(opts: TiersOptions, log_dir: Path,
             home: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    scenarios: dict[str, Any] = {}
    default_mix, flex_mix = mixes(opts, SHAREGPT_LENGTHS, FLEX_LENGTHS)
    with ExitStack() as stack:
        engine = start_sim_engine(stack, log_dir, opts)
        model = model_id(engine.url)
        key = create_key(db_url_in(home), home)
        gateway_target = Target(url="", model=model, api_key=key)
        direct = Target(engine.url, model, default_tier=None, flex_tier=None)
        engine_metrics = f"{engine.url}/metrics"
        d = Scenario("D", "flex backlog straight to the engine (no gateway)", [direct], [],
                      opts.num_flex_clients, True, [engine_metrics], [],
                      "vllm:generation_tokens_total")
        scenarios["D"] = run_scenario(d, opts, flex_mix, [engine])
        rate_engine, rate_wall = rate_for(opts, scenarios["D"]["engine_output_tps_engine"] or 0.0,
                                           default_mix)
        jobs = default_schedule(opts.seed, rate_wall, opts.duration, default_mix)
        # Extra: B's traffic straight to the engine, ordered only by its own priority queue
        # (vLLM's `priority` field, default 1 before flex 2, as the gateway's hint sends).
        by_priority = dataclasses.replace(direct, default_priority=1, flex_priority=2)
        e = Scenario("E", "default + flex backlog straight to the engine (its priority "
                      "queue only, no gateway)", [by_priority], jobs, opts.num_flex_clients, True,
                      [engine_metrics], [], "vllm:generation_tokens_total")
        if "E" not in opts.skip:
            scenarios["E"] = run_scenario(e, opts, flex_mix, [engine])
        if opts.engine_policy:
            with ExitStack() as policy_stack:
                # Its own engine: the step policy is a flag of the engine process.
                policed = start_sim_engine(policy_stack, log_dir, opts, "sim-engine-policy",
                                           "--flex-prefill-budget", str(opts.engine_policy))
                target = dataclasses.replace(by_priority, url=policed.url)
                p = Scenario("P", "E on an engine with the flex-aware step policy (flex prefills "
                             f"at most {opts.engine_policy} tokens a step, only while no default "
                             "prompt is pending)", [target], jobs, opts.num_flex_clients, True,
                             [f"{policed.url}/metrics"], [], "vllm:generation_tokens_total")
                scenarios["P"] = run_scenario(p, opts, flex_mix, [policed])
        gateways: list[tuple[bool, tuple[tuple[str, str, int], ...]]] = [
            (True, (("A", "default alone, tiered gateway", 0),
                    ("B", "default + flex backlog, tiered gateway", opts.num_flex_clients),
                    *((("F", "default + a batch of the flex backlog's jobs, tiered gateway",
                        0),) if "F" not in opts.skip else ())))]
        # Enough lines for F to keep a backlog to the window's end, at D's pace.
        lines_per_second = ((scenarios["D"]["engine_output_tps_wall"] or 0.0)
                            / flex_mix.expected_output(opts.seed))
        num_batch = opts.num_flex_clients + int(
            2 * lines_per_second * (opts.warmup_seconds + opts.duration))
        batch_jobs = list(itertools.islice(flex_jobs(opts.seed, 0, flex_mix), num_batch))
        if "C" not in opts.skip:
            gateways.append((False, (("C", "default + flex backlog, tier-blind FCFS gateway",
                                      opts.num_flex_clients),)))
        for tiers, plan in gateways:
            with ExitStack() as gateway_stack:
                gateway = start_gateway(gateway_stack, log_dir, home, opts, tiers=tiers,
                                         upstreams=[engine.url])
                target = dataclasses.replace(gateway_target, url=gateway.url)
                for name, description, num_flex in plan:
                    sc = Scenario(name, description, [target], jobs, num_flex, False,
                                   [engine_metrics], [f"{gateway.url}/metrics"],
                                   "vllm:generation_tokens_total",
                                   batch_jobs=batch_jobs if name == "F" else (),
                                   engine_capacity=opts.max_num_seqs)
                    scenarios[name] = run_scenario(sc, opts, flex_mix, [engine, gateway])
        extra = [(f"B{number}", variant) for number, variant in enumerate(opts.variants, start=1)]
        if opts.split_prefill:
            extra.append(("B-split", {"split_prefill_tokens": str(opts.split_prefill)}))
        for name, variant in extra:
            with ExitStack() as gateway_stack:
                gateway = start_gateway(gateway_stack, log_dir, home, opts, tiers=True,
                                         upstreams=[engine.url], variant=variant,
                                         name=f"gateway-{name}")
                target = dataclasses.replace(gateway_target, url=gateway.url)
                settings = ",".join(f"{k}={v}" for k, v in variant.items())
                sc = Scenario(name, f"B with {settings}", [target], jobs, opts.num_flex_clients,
                               False, [engine_metrics], [f"{gateway.url}/metrics"],
                               "vllm:generation_tokens_total", engine_capacity=opts.max_num_seqs)
                scenarios[name] = {**run_scenario(sc, opts, flex_mix, [engine, gateway]),
                                   "settings": dict(variant)}
    setup = {
        "profile": opts.profile,
        "speed": opts.speed,
        "max_num_seqs": opts.max_num_seqs,
        "max_num_batched_tokens": opts.max_num_batched_tokens or "the profile's",
        "kv_tokens": opts.kv_tokens or "the profile's",
        "cost_model": opts.cost_model,
        "prefix_caching": bool(opts.split_prefill),
        "engine_policy_flex_prefill_budget": opts.engine_policy or None,
        "scheduling_policy": "priority",
        "default_rate_per_engine_second": round(rate_engine, 3),
        "default_rate_per_wall_second": round(rate_wall, 3),
        "default_requests": len(jobs),
        "default_lengths": default_mix.describe(),
        "flex_lengths": flex_mix.describe(),
    }
    return scenarios, setup


def _run_embedded(opts: TiersOptions, log_dir: Path,
                  home: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    scenarios: dict[str, Any] = {}
    default_mix, flex_mix = mixes(opts, EMBEDDED_DEFAULT, EMBEDDED_FLEX)
    key = create_key(db_url_in(home), home)
    jobs: list[Job] = []
    rate_engine = 0.0
    for tiers in (False, True):
        with ExitStack() as stack:
            gateway = start_gateway(stack, log_dir, home, opts, tiers=tiers, upstreams=[])
            target = Target(gateway.url, model_id(gateway.url, key), key, real_text=True)
            metrics = f"{gateway.url}/metrics"
            counter = "flexserve_tokens_total|kind=completion"
            if not tiers:
                d = Scenario("D", "flex backlog through the tier-blind gateway", [target], [],
                              opts.num_flex_clients, False, [], [metrics], counter)
                scenarios["D"] = run_scenario(d, opts, flex_mix, [gateway])
                rate_engine, _ = rate_for(opts, scenarios["D"]["engine_output_tps_engine"] or 0.0,
                                           default_mix)
                jobs = default_schedule(opts.seed, rate_engine, opts.duration, default_mix)
                plan: tuple[tuple[str, str, int], ...] = (
                    ("C", "default + flex backlog, tier-blind FCFS gateway",
                     opts.num_flex_clients),)
            else:
                plan = (("A", "default alone, tiered gateway", 0),
                        ("B", "default + flex backlog, tiered gateway", opts.num_flex_clients))
            for name, description, num_flex in plan:
                sc = Scenario(name, description, [target], jobs, num_flex, False, [], [metrics],
                               counter)
                scenarios[name] = run_scenario(sc, opts, flex_mix, [gateway])
    setup = {
        "model": "SmolLM2-135M-Instruct (embedded, llama.cpp on the CPU)",
        "default_rate_per_second": round(rate_engine, 3),
        "default_requests": len(jobs),
        "default_lengths": default_mix.describe() + " (max_tokens; the model may stop sooner)",
        "flex_lengths": flex_mix.describe() + " (max_tokens; the model may stop sooner)",
        "engine_tokens_from": "the gateway's flexserve_tokens_total{kind=completion}, "
                              "counted as requests finish",
    }
    return scenarios, setup


def _progress(result: Mapping[str, Any]) -> None:
    print(f"scenario {result['scenario']}: default {result['default_completed']} done, "
          f"flex {result['flex_completed']} done, "
          f"{result['engine_output_tps_engine']} output tokens/s, {result['seconds']}, "
          f"CPU % {result['cpu_percent']}",
          file=sys.stderr)


def run_tiers(opts: TiersOptions) -> dict[str, Any]:
    """Run the four scenarios, write the JSON report, return it."""
    if opts.engine not in ("sim", "embedded"):
        raise BenchError(f"engine must be sim or embedded, not {opts.engine!r}")
    check_settings(opts.settings)
    for variant in opts.variants:
        check_settings(variant)
    if opts.variants and opts.engine != "sim":
        raise BenchError("--variant runs on the sim engine only")
    if opts.skip and opts.engine != "sim":
        raise BenchError("--skip applies to the sim engine's scenarios only")
    if opts.kv_tokens is not None and opts.engine != "sim":
        raise BenchError("--kv-tokens sizes the sim engine's KV cache; the embedded engine has its own")
    if opts.fleet:
        if opts.engine != "sim" or opts.variants or opts.skip:
            raise BenchError("--gateways/--engines run on the sim engine, without --variant or --skip")
        if opts.gateways < 1 or opts.engines < 1:
            raise BenchError("--gateways and --engines must be at least 1")
    elif opts.redis or opts.db:
        raise BenchError("--redis and --db are for a fleet (--gateways N or --engines M)")
    raise_nofile_limit()
    with contextlib.ExitStack() as stack:
        if opts.log_dir is not None:
            log_dir = opts.log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tiers-")))
        home = log_dir / "gateway-home"
        home.mkdir(exist_ok=True)
        if opts.fleet:
            from flexserve.bench.tiers_fleet import run_fleet

            report = run_fleet(opts, log_dir, stack)
            report["host"] = host_info()
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(json.dumps(report, indent=2) + "\n")
            return report
        runner = _run_sim if opts.engine == "sim" else _run_embedded
        scenarios, setup = runner(opts, log_dir, home)
    report = {
        "benchmark": "tiers",
        "command": opts.command,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": host_info(),
        "setup": {
            "engine": opts.engine,
            "duration_seconds": opts.duration,
            "warmup_seconds": opts.warmup_seconds,
            "seed": opts.seed,
            "load": opts.load,
            "flex_clients": opts.num_flex_clients,
            "gateway_settings": dict(opts.settings),
            "scheduler_has_tiers_enabled": tiers_enabled_available(),
            **setup,
            "clocks": "TTFT/TPOT *_ms: wall clock at the client; *_engine_ms: wall x speed. "
                      "Output tokens/s: engine counter over the window's wall seconds "
                      "(_wall), divided by speed (_engine). pace: engine ITL (simulated) / "
                      "client ITL x speed; 1 = the sim engine kept real time.",
        },
        "scenarios": scenarios,
        "ratios": goal_ratios(scenarios),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    write_plots(report, opts.out)
    return report


def render(report: Mapping[str, Any], markdown: bool = False) -> str:
    """The printed table of a report."""
    if "layouts" in report:
        from flexserve.bench.tiers_fleet import render_fleet

        return render_fleet(report, markdown=markdown)
    return format_table(report["scenarios"], report["ratios"], markdown=markdown)


def command_line(argv: Sequence[str]) -> str:
    """The command as typed, for the report."""
    return "flexserve " + " ".join(shlex.quote(a) for a in argv)
