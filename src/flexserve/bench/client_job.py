"""``flexserve bench client``: a bulk flex job run by ``flexserve run``'s runner.

1. **Job completion.** A sim engine and a FlexServe gateway in front of it
   (separate processes); default traffic at ``load`` of the engine's
   maximum output (measured first, as ``bench tiers`` scenario D does) runs
   throughout; a flex job of ``lines`` requests is run to the end by the
   runner (``client/runner.py``), once with adaptive concurrency and once
   with a fixed ``fixed`` in flight. Reported per mode: completion time,
   429s received, retries, the concurrency the adaptive limit reached.
2. **Runner overhead.** The same runner against a sim engine with the
   ``instant`` profile, no gateway, ``fixed`` in flight: lines per second,
   and per second of the runner's own CPU (its process, measured).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from flexserve.bench.processes import (
    BenchError,
    create_key,
    flexserve_command,
    free_port,
    start_server,
)
from flexserve.bench.report import host_info
from flexserve.bench.tiers import (
    Scenario,
    TiersOptions,
    db_url_in,
    model_id,
    run_scenario,
    start_gateway,
    start_sim_engine,
)
from flexserve.bench.tiers_load import Target, send_job
from flexserve.bench.traffic import (
    FLEX_LENGTHS,
    SHAREGPT_LENGTHS,
    LengthMix,
    default_schedule,
    flex_jobs,
    messages_for,
)
from flexserve.client.calls import CallPolicy
from flexserve.client.jobs import Line
from flexserve.client.runner import Progress, RunOptions, run_job

# The job's lines: moderate prompts, short answers (a data-enrichment job).
JOB_LENGTHS = LengthMix("job", "uniform", 200, 800, 32, 96, 200, 800, 32, 96)


@dataclass(frozen=True)
class ClientBenchConfig:
    lines: int = 2000
    fixed: int = 64
    load: float = 0.4
    speed: float = 1.0
    max_num_seqs: int = 32
    flex_max_wait: float = 5.0
    overhead_lines: int = 5000
    seed: int = 0
    log_dir: Path | None = None
    command: str = ""


def _job(model: str, seed: int, num_lines: int) -> list[Line]:
    jobs = flex_jobs(seed, 0, JOB_LENGTHS)
    lines = []
    for i in range(num_lines):
        job = next(jobs)
        lines.append(Line(f"job-{i}", "/v1/chat/completions", {
            "model": model, "messages": messages_for(job, real_text=False),
            "max_tokens": job.output_tokens, "seed": job.seed}))
    return lines


async def _run(base_url: str, api_key: str, lines: list[Line], out: Path,
               options: RunOptions) -> tuple[Progress, float, int]:
    most = 0

    def watch(progress: Progress) -> None:
        nonlocal most
        most = max(most, progress.limit)

    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none") as client:
        cpu = time.process_time()
        progress = await run_job(client, lines, out, options, on_progress=watch)
        cpu = time.process_time() - cpu
    return progress, cpu, most


async def _with_default_load(target: Target, rate: float, seed: int, body: Any) -> Any:
    """Run ``body`` (a coroutine) while default requests arrive at ``rate``."""
    import aiohttp

    schedule = default_schedule(seed, rate, 3600.0, SHAREGPT_LENGTHS)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.monotonic()
        sent: set[asyncio.Task[Any]] = set()

        async def load() -> None:
            for job in schedule:
                await asyncio.sleep(max(0.0, start + job.at - time.monotonic()))
                task = asyncio.create_task(send_job(session, target, job, "default", True))
                sent.add(task)
                task.add_done_callback(sent.discard)

        loader = asyncio.create_task(load())
        try:
            return await body
        finally:
            loader.cancel()
            for task in list(sent):
                task.cancel()
            await asyncio.gather(loader, *sent, return_exceptions=True)


def run_client_bench(config: ClientBenchConfig, log_dir: Path) -> dict[str, Any]:
    opts = TiersOptions(duration=10.0, warmup=1.0, speed=config.speed,
                        max_num_seqs=config.max_num_seqs, seed=config.seed)
    report: dict[str, Any] = {
        "benchmark": "client", "command": config.command,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": host_info(),
        "setup": {"lines": config.lines, "fixed": config.fixed, "load": config.load,
                  "speed": config.speed, "max_num_seqs": config.max_num_seqs,
                  "flex_max_wait": config.flex_max_wait,
                  "job_lengths": JOB_LENGTHS.describe()},
        "modes": {},
    }
    with ExitStack() as stack:
        engine = start_sim_engine(stack, log_dir, opts)
        model = model_id(engine.url)
        direct = Target(engine.url, model, default_tier=None, flex_tier=None)
        d = Scenario("D", "flex backlog straight to the engine", [direct], [], opts.num_flex_clients, True, [f"{engine.url}/metrics"], [],
                     "vllm:generation_tokens_total")
        most_tps = run_scenario(d, opts, FLEX_LENGTHS, [engine])["engine_output_tps_engine"] or 0.0
        if most_tps <= 0:
            raise BenchError("the engine produced no output while measuring its maximum")
        rate = config.load * most_tps / SHAREGPT_LENGTHS.expected_output(config.seed) * config.speed
        report["setup"]["engine_max_output_tps"] = most_tps
        report["setup"]["default_rate_per_second"] = round(rate, 3)
        home = log_dir / "gateway-home"
        home.mkdir(exist_ok=True)
        key = create_key(db_url_in(home), home)
        gateway = start_gateway(
            stack, log_dir, home,
            dataclasses.replace(opts, settings={"flex_max_wait": str(config.flex_max_wait)}),
            tiers=True, upstreams=[engine.url])
        target = Target(gateway.url, model, key)
        lines = _job(model, config.seed, config.lines)
        for mode, concurrency in (("adaptive", None), (f"fixed {config.fixed}", config.fixed)):
            options = RunOptions(policy=CallPolicy(tier="flex"), concurrency=concurrency)
            started = time.monotonic()
            progress, cpu, most = asyncio.run(_with_default_load(
                target, rate, config.seed + len(report["modes"]),
                _run(gateway.url + "/v1", key, lines, log_dir / f"{mode}.jsonl", options)))
            report["modes"][mode] = {
                "seconds": round(time.monotonic() - started, 1),
                "answered": progress.done, "failed": progress.failed,
                "429s": progress.refusals, "retries": progress.retries,
                "most_in_flight_allowed": most,
                "output_tokens": progress.output_tokens,
                "runner_cpu_seconds": round(cpu, 2),
            }
    report["overhead"] = _overhead(config, log_dir)
    return report


def _overhead(config: ClientBenchConfig, log_dir: Path) -> dict[str, Any]:
    """The runner alone against an instant engine (no gateway)."""
    with ExitStack() as stack:
        port = free_port()
        engine = start_server(stack, "instant-engine", flexserve_command(
            "sim-engine", "--port", str(port), "--profile", "instant", "--max-num-seqs", "1024"),
            port, "/health", log_dir)
        model = model_id(engine.url)
        rng = random.Random(config.seed)
        lines = [Line(f"o-{i}", "/v1/chat/completions", {
            "model": model, "max_tokens": 8,
            "messages": [{"role": "user", "content": f"Item {rng.random()}"}]})
            for i in range(config.overhead_lines)]
        options = RunOptions(policy=CallPolicy(tier=None), concurrency=config.fixed)
        started = time.monotonic()
        progress, cpu, _ = asyncio.run(_run(engine.url + "/v1", "", lines,
                                            log_dir / "overhead.jsonl", options))
        seconds = time.monotonic() - started
    return {"lines": progress.done, "seconds": round(seconds, 2),
            "lines_per_second": round(progress.done / seconds, 1),
            "runner_cpu_seconds": round(cpu, 2),
            "lines_per_cpu_second": round(progress.done / cpu, 1) if cpu else None}


def format_report(report: dict[str, Any]) -> str:
    setup = report["setup"]
    rows = [f"{setup['lines']:,} flex lines, default at {setup['load']} of "
            f"{setup['engine_max_output_tps']:,.0f} output tokens/s "
            f"({setup['default_rate_per_second']}/s), flex_max_wait {setup['flex_max_wait']} s",
            f"{'mode':<12} {'seconds':>8} {'429s':>6} {'retries':>8} {'most allowed':>13} "
            f"{'runner CPU s':>13}"]
    for mode, result in report["modes"].items():
        rows.append(f"{mode:<12} {result['seconds']:>8} {result['429s']:>6} {result['retries']:>8} "
                    f"{result['most_in_flight_allowed']:>13} {result['runner_cpu_seconds']:>13}")
    overhead = report["overhead"]
    rows.append(f"runner alone, instant engine, {setup['fixed']} in flight: "
                f"{overhead['lines_per_second']:,} lines/s, "
                f"{overhead['lines_per_cpu_second']:,} lines per CPU second")
    return "\n".join(rows)
