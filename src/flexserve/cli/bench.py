"""`flexserve bench …`: benchmark scenarios, each writing a JSON report and printing a table."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from flexserve.engines.sim.profiles import COST_MODELS


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc


def _names(text: str | None, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return names


@click.group()
def bench() -> None:
    """Run a benchmark scenario and write its JSON report."""


@bench.command("overhead")
@click.option("--rates", help="Request rates per second, comma-separated [20,200,1000].")
@click.option("--duration", type=float, help="Seconds of sending per phase [3].")
@click.option("--min-requests", type=int, help="Each phase sends at least this many requests [100].")
@click.option("--rounds", type=int, help="Interleaved rounds per rate [4].")
@click.option("--modes", help="non-stream, stream or both, comma-separated [both].")
@click.option("--targets", help="direct, passthrough, flexserve, litellm (direct always runs) [all].")
@click.option("--baseline-src", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The `src` folder of another FlexServe tree (say a `git worktree` of main), run "
              "as target `baseline` beside this one: an A/B of a change in one run.")
@click.option("--litellm", "litellm", type=click.Path(dir_okay=False),
              help="The `litellm` executable of a separate virtualenv; without it LiteLLM is skipped.")
@click.option("--litellm-max-rate", type=float, help="Highest rate sent to LiteLLM [20].")
@click.option("--sustain-rates", help="Rates tried for the sustained-rate search, '' for none "
              "[250,500,750,1000,1500,2000].")
@click.option("--sustain-rounds", type=int, help="Rounds per rate in that search [2].")
@click.option("--sustain-p99-ms", type=float, help="p99 overhead bound of that search [10].")
@click.option("--arrivals", type=click.Choice(["poisson", "fixed"]), help="Arrival process [poisson].")
@click.option("--warmup", type=float, help="Seconds of unrecorded warm-up per target and mode [1].")
@click.option("--service-tier", type=click.Choice(["auto", "default", "flex", "priority"]),
              help="service_tier sent with every request [none: the project's default].")
@click.option("--profile-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Sample the proxies with py-spy during their phases, raw stacks to this "
              "folder (the latencies of such a run are not figures).")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the servers' logs here (default: a temporary folder).")
@click.option("--quick", is_flag=True, help="A smoke run: 20 and 200 req/s, half-second phases, one round.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("reports/overhead.json"), show_default=True, help="JSON report path.")
def overhead(quick: bool, out: Path, **options: Any) -> None:
    """Gateway overhead over a direct call, against a bare proxy and LiteLLM.

    Starts a sim engine (profile `instant`), a FlexServe gateway in front of
    it, the bare pass-through proxy and, with --litellm, the LiteLLM proxy,
    each as its own process on loopback; sends the same open-loop load to
    each, interleaved in short rounds, non-streaming and streaming (time to
    first byte); reports p50/p99 latency and overhead per target and rate and
    the highest rate FlexServe sustains with p99 overhead within the bound.
    """
    from flexserve.bench.overhead import (
        MODES,
        QUICK,
        TARGETS,
        OverheadConfig,
        format_report,
        run_overhead,
    )
    from flexserve.bench.processes import BenchError
    from flexserve.bench.report import write_json

    changes = {
        "rates": _floats(options["rates"]),
        "duration": options["duration"],
        "min_requests": options["min_requests"],
        "rounds": options["rounds"],
        "modes": _names(options["modes"], MODES),
        "targets": _names(options["targets"], TARGETS),
        "litellm": options["litellm"],
        "baseline_src": options["baseline_src"],
        "litellm_max_rate": options["litellm_max_rate"],
        "sustain_rates": _floats(options["sustain_rates"]),
        "sustain_rounds": options["sustain_rounds"],
        "sustain_p99_ms": options["sustain_p99_ms"],
        "arrivals": options["arrivals"],
        "warmup": options["warmup"],
        "service_tier": options["service_tier"],
        "profile_dir": options["profile_dir"],
        "log_dir": options["log_dir"],
    }
    base = QUICK if quick else OverheadConfig()
    config = dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
    try:
        report = run_overhead(config)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    write_json(out, report)
    click.echo(format_report(report))
    click.echo(f"report: {out}", err=True)


@bench.command("flex-queue")
@click.option("--num-waiting", type=int, help="Flex requests left waiting in the queue [10000].")
@click.option("--hold", type=float, help="Seconds measured while they all wait [10].")
@click.option("--ramp-rate", type=float, help="Flex connections opened per second [2000].")
@click.option("--max-wait", type=float, help="X-Flex-Max-Wait of each flex request, seconds [600].")
@click.option("--quick", is_flag=True, help="A smoke run: 200 waiting requests, one-second hold.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("reports/flex-queue.json"), show_default=True, help="JSON report path.")
def flex_queue(quick: bool, out: Path, **options: Any) -> None:
    """Memory and event-loop lag with N flex requests waiting in the queue.

    A gateway with one slot on a slow sim engine; long default streams hold
    the slot while N flex requests wait, each on its own connection. Reports
    the gateway's RSS (/proc/PID/status) and its loop lag, measured from
    outside as GET /healthz latency over the idle gateway's.
    """
    from flexserve.bench.flex_queue import QUICK, FlexQueueConfig, format_report, run_flex_queue
    from flexserve.bench.processes import BenchError
    from flexserve.bench.report import write_json

    base = QUICK if quick else FlexQueueConfig()
    config = dataclasses.replace(base, **{k: v for k, v in options.items() if v is not None})
    try:
        report = run_flex_queue(config)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    write_json(out, report)
    click.echo(format_report(report))
    click.echo(f"report: {out}", err=True)


@bench.command("hot-path")
@click.option("--baseline-src", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The `src` folder of another FlexServe tree, measured the same way, interleaved.")
@click.option("--requests", "num_requests", type=int, default=1000, show_default=True,
              help="Requests per repeat.")
@click.option("--repeats", type=int, default=7, show_default=True, help="Repeats per trial.")
@click.option("--trials", type=int, default=3, show_default=True,
              help="Fresh interpreters per tree; the minimum of all is kept.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("reports/hot-path.json"), show_default=True, help="JSON report path.")
def hot_path(baseline_src: Path | None, num_requests: int, repeats: int, trials: int,
             out: Path) -> None:
    """CPU cost of the request path and its parts, in process (no sockets).

    Minimum over repeats of the mean per request: noise on a shared machine
    only adds, so these figures hold still where end-to-end latencies do not.
    With --baseline-src, an A/B of a change against another tree.
    """
    from flexserve.bench.hot_path import format_report, run_hot_path
    from flexserve.bench.processes import BenchError
    from flexserve.bench.report import write_json

    try:
        report = run_hot_path(baseline_src, num_requests=num_requests, repeats=repeats,
                              trials=trials)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    write_json(out, report)
    click.echo(format_report(report))
    click.echo(f"report: {out}", err=True)


@bench.command("ledger-kill")
@click.option("--repeats", type=int, help="Rounds per case (unlocked, write-locked) [5].")
@click.option("--traffic-seconds", type=float, help="Seconds of traffic before each kill [3].")
@click.option("--lock-seconds", type=float,
              help="Seconds the database is write-locked before the kill, in locked rounds [2].")
@click.option("--baseline-src", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The `src` folder of another FlexServe tree, killed the same way, interleaved.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("reports/ledger-kill.json"), show_default=True, help="JSON report path.")
def ledger_kill(out: Path, **options: Any) -> None:
    """Responses delivered vs ledger rows when the gateway is killed with SIGKILL.

    Each round: a gateway process on the sim engine under back-to-back
    traffic from six client threads, SIGKILL (in the locked case after the
    SQLite database has been write-locked by another connection for
    --lock-seconds), a restart on the same home, then every response a
    client received in full matched to ledger rows by x-request-id.
    """
    from flexserve.bench.ledger_kill import LedgerKillConfig, format_report, run_ledger_kill
    from flexserve.bench.processes import BenchError
    from flexserve.bench.report import write_json

    config = dataclasses.replace(
        LedgerKillConfig(), **{k: v for k, v in options.items() if v is not None}
    )
    try:
        report = run_ledger_kill(config)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    write_json(out, report)
    click.echo(format_report(report))
    click.echo(f"report: {out}", err=True)


@bench.command("tiers")
@click.option("--engine", type=click.Choice(["sim", "embedded"]), default="sim", show_default=True,
              help="sim: the sim engine behind an upstream gateway; embedded: SmolLM2 inside it.")
@click.option("--duration", type=float, help="Measured seconds per scenario [sim 60, embedded 45].")
@click.option("--warmup", type=float, help="Seconds of flex backlog before each window [10%].")
@click.option("--quick", is_flag=True, help="A smoke run: short outputs, 2-second scenarios "
              "(15 s on the embedded engine).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of all traffic.")
@click.option("--profile", default="h100-llama3-8b", show_default=True, help="Sim engine profile.")
@click.option("--speed", type=float, default=1.0, show_default=True,
              help="Sim engine speed-up; client latencies x speed = engine time.")
@click.option("--max-num-seqs", type=int, default=32, show_default=True,
              help="Sim engine batch size, and the gateway's upstream capacity.")
@click.option("--max-num-batched-tokens", type=int,
              help="Sim engine's step token budget (vLLM's flag) [the profile's: 8192 on H100].")
@click.option("--kv-tokens", type=click.IntRange(min=2),
              help="Sim engine's KV cache in tokens (sim-engine --kv-tokens) [the profile's: "
              "420,000 on H100]; smaller, cached prompt blocks are evicted sooner.")
@click.option("--cost-model", type=click.Choice(COST_MODELS), default="flat",
              show_default=True, help="Sim engine's step-time cost model (sim-engine --cost-model).")
@click.option("--flex-clients", type=int, help="Closed-loop flex clients [2x the engine's batch].")
@click.option("--load", type=float, default=0.4, show_default=True,
              help="Default traffic as a fraction of D's output tokens/s.")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="A gateway setting (FLEXSERVE_NAME), e.g. --set tpot_slo=0.02; repeatable.")
@click.option("--variant", "variants", multiple=True, metavar="NAME=VALUE[,NAME=VALUE...]",
              help="Sim only: one more B scenario (B1, B2, ...) with these gateway settings "
              "on top of --set, e.g. --variant tpot_slo=0.0075; repeatable: a sweep in one run.")
@click.option("--split-prefill", type=int, default=0, show_default=True,
              help="Sim only: scenario B-split, B with the gateway's split prefill in pieces of "
              "this many tokens (the sim engine then caches prefixes in every scenario); 0: none.")
@click.option("--engine-policy", type=int, default=0, show_default=True,
              help="Sim only: scenario P, E's traffic on a sim engine whose flex-aware step policy "
              "lets flex prefill this many tokens a step, only while no default prompt is "
              "pending (sim-engine --flex-prefill-budget); 0: none.")
@click.option("--skip", type=click.Choice(["C", "E", "F"]), multiple=True,
              help="Leave out a scenario (sim: C, E, F) to shorten a sweep; repeatable.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON report path [reports/bench-tiers.json, -embedded.json].")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the servers' logs here (default: a temporary directory).")
@click.option("--gateways", type=int, default=1, show_default=True,
              help="Sim only: D, A and B on this many gateways sharing Redis (and --engines), "
              "against one gateway in front of one engine.")
@click.option("--engines", type=int, default=1, show_default=True,
              help="Sim only: this many sim engines behind the gateways, same traffic per engine.")
@click.option("--redis", "redis_url", help="The fleet's Redis URL [a throwaway redis-server].")
@click.option("--db", "db_url", help="The fleet's database URL [a SQLite file].")
def tiers(engine: str, duration: float | None, warmup: float | None, quick: bool, seed: int,
          profile: str, speed: float, max_num_seqs: int, max_num_batched_tokens: int | None,
          kv_tokens: int | None, cost_model: str, flex_clients: int | None, load: float,
          settings: tuple[str, ...], variants: tuple[str, ...], split_prefill: int,
          engine_policy: int, skip: tuple[str, ...],
          out: Path | None, log_dir: Path | None, gateways: int, engines: int,
          redis_url: str | None, db_url: str | None) -> None:
    """Default latency under a flex backlog: scenarios A-E in one run.

    D: a saturating flex backlog straight to the engine (its maximum output
    tokens/s); A: default traffic alone at --load of D, through a FlexServe
    gateway; B: A plus the flex backlog; C: B through a tier-blind FCFS
    gateway (tiers_enabled=false); E (sim only): B's traffic straight to the
    engine, ordered by its own priority queue; B1, B2, ...: B with each
    --variant's settings. Prints the table and the goal ratios
    (docs/benchmarks.md explains each figure and its clock).

    With --gateways N or --engines M: D, A and B on one gateway in front of
    one engine, then on N gateways in front of M engines, and the fleet's
    ratios against the single pair's. Both serve the same default requests
    at the same rate per engine: the single pair's A and B take M times
    --duration.
    """
    import sys

    from flexserve.bench.processes import BenchError
    from flexserve.bench.tiers import TiersOptions, command_line, render, run_tiers

    pairs = _settings(settings, "--set")
    sweep = tuple(_settings(v.split(","), "--variant") for v in variants)
    default_out = "reports/bench-tiers.json" if engine == "sim" else "reports/bench-tiers-embedded.json"
    options = TiersOptions(
        engine=engine, duration=duration or (
            (2.0 if engine == "sim" else 15.0) if quick else (60.0 if engine == "sim" else 45.0)),
        warmup=warmup, seed=seed, profile=profile, speed=speed, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, kv_tokens=kv_tokens, cost_model=cost_model,
        flex_clients=flex_clients, load=load, settings=pairs, variants=sweep,
        split_prefill=split_prefill, engine_policy=engine_policy, skip=frozenset(skip),
        out=out or Path(default_out),
        quick=quick, log_dir=log_dir, command=command_line(sys.argv[1:]),
        gateways=gateways, engines=engines, redis=redis_url, db=db_url,
    )
    try:
        report = run_tiers(options)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(render(report))
    click.echo(f"report: {options.out}", err=True)
    if not options.fleet:
        click.echo(f"plots: {options.out.with_suffix('.html')}", err=True)


@bench.command("client")
@click.option("--lines", type=int, default=2000, show_default=True, help="Lines of the flex job.")
@click.option("--fixed", type=int, default=64, show_default=True,
              help="In flight in the fixed-concurrency run (and the overhead run).")
@click.option("--load", type=float, default=0.4, show_default=True,
              help="Default traffic as a fraction of the engine's maximum output tokens/s.")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Sim engine speed-up.")
@click.option("--flex-max-wait", type=float, default=5.0, show_default=True,
              help="The gateway's flex_max_wait: longer estimated waits are refused (429).")
@click.option("--overhead-lines", type=int, default=5000, show_default=True,
              help="Lines of the runner-alone run against an instant engine.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("reports/bench-client.json"), show_default=True, help="JSON report path.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the servers' logs and the job outputs here (default: a temporary folder).")
def client(lines: int, fixed: int, load: float, speed: float, flex_max_wait: float,
           overhead_lines: int, out: Path, log_dir: Path | None) -> None:
    """A flex job run by `flexserve run`'s runner: adaptive against fixed concurrency.

    A sim engine and a gateway, default traffic at --load throughout, and a
    job of --lines flex requests run to the end twice (adaptive, then
    --fixed in flight): completion time and 429s of each; then the runner
    alone against an instant engine: lines per second and per CPU second.
    """
    import sys
    import tempfile

    from flexserve.bench.client_job import ClientBenchConfig, format_report, run_client_bench
    from flexserve.bench.processes import BenchError
    from flexserve.bench.report import write_json
    from flexserve.bench.tiers import command_line

    config = ClientBenchConfig(lines=lines, fixed=fixed, load=load, speed=speed,
                               flex_max_wait=flex_max_wait, overhead_lines=overhead_lines,
                               command=command_line(sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="bench-client-") as temporary:
        folder = log_dir or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            report = run_client_bench(config, folder)
        except BenchError as exc:
            raise click.ClickException(str(exc)) from exc
    write_json(out, report)
    click.echo(format_report(report))
    click.echo(f"report: {out}", err=True)


def _settings(items: Sequence[str], option: str) -> dict[str, str]:
    """``NAME=VALUE`` items as a dict of lower-case gateway setting names."""
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint=option)
        pairs[name.strip().lower()] = value
    return pairs


@bench.command("waits")
@click.option("--quick", is_flag=True, help="A smoke run: short outputs, bursts of 40 and 80, "
              "about a minute and a half.")
@click.option("--seed", type=int, help="Seed of all traffic [0].")
@click.option("--profile", help="Sim engine profile [h100-llama3-8b].")
@click.option("--speed", type=float, help="Sim engine speed-up [1]; deadlines stay wall seconds.")
@click.option("--max-num-seqs", type=int, help="Sim engine batch and the gateway's upstream "
              "capacity [32; quick 16].")
@click.option("--load", type=float, help="Default traffic as a fraction of capacity [0.4].")
@click.option("--cold-burst", type=int, help="Flex requests of the cold-start burst [300].")
@click.option("--sequential-burst", type=int, help="Flex requests of the burst after the "
              "trickle [300].")
@click.option("--parallel-burst", type=int, help="Flex requests sent at once [600].")
@click.option("--deadlines", help="X-Flex-Max-Wait values, comma-separated, drawn evenly "
              "[1,5,20,60,180,600].")
@click.option("--gap", type=float, help="Quiet seconds between scenarios [30].")
@click.option("--tolerance-floor", type=float, help="Seconds within which an estimate near zero "
              "counts as right, beside the 25 % [0.1].")
@click.option("--retry-cap", type=float, help="Longest Retry-After waited for, seconds [120].")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="A gateway setting (FLEXSERVE_NAME); repeatable.")
@click.option("--gateway-src", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The `src` folder of another FlexServe tree to run the gateway from (say "
              "an earlier commit's, to compare estimators).")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the servers' logs, the gateway's database and every attempt "
              "(attempts.jsonl) here (default: a temporary folder).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("reports/waits.json"), show_default=True, help="JSON report path.")
def waits(quick: bool, deadlines: str | None, settings: tuple[str, ...], out: Path,
          **options: Any) -> None:
    """Flex wait estimates, Retry-After and refusals under bursts and cold starts.

    A sim engine and a gateway in front of it, default traffic at --load of
    the engine's measured capacity throughout, and three flex scenarios in
    turn: a burst with no flex before (cold), a trickle then a burst, and a
    burst sent at once. Reports per scenario the share of served flex
    requests that started within 25 % of the estimate they were given (the
    status read before sending, and the gateway's x-flex-estimated-wait), the
    share of retries at Retry-After served per deadline, false refusals,
    completion of the longest deadline and the engine's load.
    """
    import sys

    from flexserve.bench.processes import BenchError
    from flexserve.bench.report import write_json
    from flexserve.bench.waits import QUICK, WaitsOptions, command_line, run_waits, with_changes
    from flexserve.bench.waits_report import format_report

    opts = with_changes(QUICK if quick else WaitsOptions(), **options,
                        deadlines=_floats(deadlines), settings=_settings(settings, "--set") or None,
                        out=out, command=command_line(sys.argv[1:]))
    try:
        report = run_waits(opts)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    write_json(out, report)
    click.echo(format_report(report))
    click.echo(f"report: {out}", err=True)


@bench.command("batches")
@click.option("--lines", type=int, help="Lines of the batch whose gateway memory is sampled [50000].")
@click.option("--throughput-lines", type=int,
              help="Lines of the throughput batch, and requests of the direct run [10000].")
@click.option("--kill-lines", type=int, help="Lines of the batch whose gateway is killed [10000].")
@click.option("--kill-after", type=float,
              help="Share of the kill batch completed before SIGKILL [0.25].")
@click.option("--max-tokens", type=int, help="max_tokens of every line [16].")
@click.option("--profile", help="Sim engine profile [h100-llama3-8b].")
@click.option("--speed", type=float, help="Sim engine speed-up of the throughput figure [1].")
@click.option("--fast-speed", type=float,
              help="Sim engine speed-up of the memory and restart figures [10].")
@click.option("--max-num-seqs", type=int, help="Sim engine batch, the gateway's upstream "
              "capacity and the direct run's concurrency [32].")
@click.option("--quick", is_flag=True, help="A smoke run: batches of a few dozen to a few "
              "hundred lines.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the servers' logs, homes and input files here (default: a temporary "
              "folder).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("reports/batches.json"), show_default=True,
              help="JSON report path; the Markdown report is written beside it (.md).")
def batches(quick: bool, out: Path, **options: Any) -> None:
    """Batch API throughput against direct calls, gateway memory, and restart after kill -9.

    A sim engine and a gateway in front of it (each its own process). One
    batch of --throughput-lines chat completions from create to completed,
    against the same bodies sent straight to the engine at its batch size;
    the gateway's RSS before, at the peak of and after a batch of --lines
    lines, upload to output file; a batch whose gateway is killed with
    SIGKILL mid-run and restarted on the same home: time to the first answer
    and to the first line completed after the kill, then every custom_id
    once in the output and one batch-tier ledger row per output line.
    """
    import shlex
    import sys

    from flexserve.bench.batches import QUICK, BatchesConfig, run_batches
    from flexserve.bench.batches_report import format_report
    from flexserve.bench.processes import BenchError
    from flexserve.bench.report import write_json

    command = "flexserve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    config = dataclasses.replace(QUICK if quick else BatchesConfig(), command=command,
                                 **{k: v for k, v in options.items() if v is not None})
    try:
        report = run_batches(config)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    write_json(out, report)
    markdown = format_report(report)
    out.with_suffix(".md").write_text(markdown + "\n")
    click.echo(markdown)
    click.echo(f"report: {out}", err=True)


@bench.command("shared-state")
@click.option("--redis", "redis_url", required=True, help="Redis URL to measure against (redis://…).")
@click.option("--requests", "num_requests", type=int, default=2000, show_default=True,
              help="Admissions timed one at a time (and again with --concurrency at once).")
@click.option("--concurrency", type=int, default=64, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("reports/shared-state.json"), show_default=True,
              help="JSON report path; the Markdown report is written beside it (.md).")
def shared_state(redis_url: str, num_requests: int, concurrency: int, out: Path) -> None:
    """What budgets and rate limits in Redis cost a request, beside in-process ones."""
    import shlex
    import sys

    from flexserve.bench.report import write_json
    from flexserve.bench.shared_state import SharedStateConfig, format_report, run_shared_state

    command = "flexserve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_shared_state(SharedStateConfig(redis_url, num_requests, concurrency, command=command))
    write_json(out, report)
    markdown = format_report(report)
    out.with_suffix(".md").write_text(markdown + "\n")
    click.echo(markdown)
    click.echo(f"report: {out}", err=True)


@bench.command("prefill-waits")
@click.argument("log_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the figures as JSON here.")
def prefill_waits(log_dir: Path, out: Path | None) -> None:
    """What default's first token waited behind in a `bench tiers --log-dir` run:
    scenario B's default requests by the prompt tokens pending on their replica
    when they arrived (src/flexserve/bench/prefill_waits.py)."""
    from flexserve.bench.prefill_waits import format_report, run
    from flexserve.bench.report import write_json

    layouts = run(log_dir)
    if not layouts:
        raise click.ClickException(f"no gateway request logs (*-gateway-*.log) in {log_dir}; "
                                   "give the --log-dir of a `flexserve bench tiers` run")
    click.echo(format_report(layouts))
    if out is not None:
        write_json(out, {"benchmark": "prefill-waits", "log_dir": str(log_dir), "layouts": layouts})
        click.echo(f"report: {out}", err=True)
