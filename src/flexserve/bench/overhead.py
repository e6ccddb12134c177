"""What the gateway costs: the same open-loop load, interleaved, to each target.

Targets, each a separate process on loopback in front of one sim engine with
the ``instant`` profile (it answers at once, so all latency is the path's):

- ``direct``: the sim engine itself — the floor, the load generator's own cost included;
- ``passthrough``: the bare proxy of ``flexserve.bench.passthrough``;
- ``flexserve``: ``flexserve serve --engine upstream``, with auth, validation,
  tier resolution, scheduling, metrics and usage records;
- ``litellm``: the LiteLLM proxy, when ``--litellm PATH`` names its executable
  (one process, no database); only at rates up to ``litellm_max_rate``.

For each mode (non-stream; stream, measured at the first body byte) and rate,
every round sends a short phase to each target in turn, the order rotating
between rounds, so that a noisy neighbour on the machine hits all targets
alike. A target's overhead is its percentile minus the direct call's, from
the same rounds. A last search raises the rate on ``direct`` and
``flexserve`` until FlexServe's p99 overhead passes ``sustain_p99_ms`` (or
it errs), and reports the highest rate it sustained.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from flexserve.bench import profile
from flexserve.bench.loadgen import (
    Arrivals,
    LoadGenerator,
    Phase,
    PhaseResult,
    Target,
    run_on_uvloop,
)
from flexserve.bench.processes import (
    BenchError,
    Server,
    cpu_seconds,
    proc_status,
    raise_nofile_limit,
    start_gateway,
    start_litellm,
    start_passthrough,
    start_sim_engine,
)
from flexserve.bench.report import format_table, host_info, percentile, summary_ms
from flexserve.engines.sim.profiles import PROFILES

TARGETS = ("direct", "passthrough", "flexserve", "baseline", "litellm")
MODES = ("non-stream", "stream")


@dataclass(frozen=True)
class OverheadConfig:
    """How the overhead benchmark runs (see ``flexserve bench overhead --help``)."""

    rates: tuple[float, ...] = (20, 200, 1000)
    # Seconds of sending per phase (one target, one rate, one round)…
    duration: float = 3.0
    # …stretched at low rates so that each phase sends at least this many requests.
    min_requests: int = 100
    rounds: int = 4
    modes: tuple[str, ...] = MODES
    targets: tuple[str, ...] = TARGETS
    # Another tree's `src` folder: its FlexServe runs as target "baseline" (A/B of a change).
    baseline_src: Path | None = None
    # Path to the `litellm` executable of a separate virtualenv; None: LiteLLM skipped.
    litellm: str | None = None
    # LiteLLM falls over at about 50 requests/s on two cores: it gets no rate above this.
    litellm_max_rate: float = 20
    # Rates tried, in order, for the highest one FlexServe sustains (empty: no search).
    sustain_rates: tuple[float, ...] = (250, 500, 750, 1000, 1500, 2000)
    sustain_rounds: int = 2
    sustain_p99_ms: float = 10.0
    arrivals: Arrivals = "poisson"
    # Seconds of warm-up load per target and mode, not recorded.
    warmup: float = 1.0
    max_tokens: int = 16
    # `service_tier` sent in every request (None: absent, so FlexServe serves `auto`).
    service_tier: str | None = None
    seed: int = 1
    # Where py-spy profiles of the proxies' phases go; None: no profiling. Profiling
    # pauses the server while it samples, so such a run's latencies are not figures.
    profile_dir: Path | None = None
    # Where the servers' logs (and the gateway's database) are kept; None: a temporary folder.
    log_dir: Path | None = None

    def phase_duration(self, rate: float) -> float:
        return max(self.duration, self.min_requests / rate)


QUICK = OverheadConfig(
    rates=(20, 200), duration=0.5, min_requests=10, rounds=1, sustain_rates=(200,),
    sustain_rounds=1, warmup=0.3,
)


@dataclass(slots=True)
class _Cell:
    """One target at one rate in one mode, over all rounds."""

    result: PhaseResult
    # CPU seconds the target's server process used during its phases.
    cpu: float = 0.0
    # CPU seconds this process (the load generator) used meanwhile.
    loadgen_cpu: float = 0.0


def run_overhead(config: OverheadConfig) -> dict[str, Any]:
    """Start the servers, send the load, and return the report."""
    raise_nofile_limit()
    model_id = PROFILES["instant"].model_id
    if config.profile_dir is not None:
        _py_spy()
        config.profile_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flexserve-bench-") as tmp, ExitStack() as stack:
        log_dir = config.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        sim = start_sim_engine(stack, log_dir, profile="instant")
        servers: dict[str, Server] = {"direct": sim}
        targets = {"direct": Target("direct", sim.url + "/v1/chat/completions")}
        if "passthrough" in config.targets:
            servers["passthrough"] = start_passthrough(stack, log_dir, sim.url)
        if "flexserve" in config.targets:
            servers["flexserve"], key = start_gateway(stack, log_dir, sim.url)
            targets["flexserve"] = Target(
                "flexserve", servers["flexserve"].url + "/v1/chat/completions",
                {"Authorization": f"Bearer {key}"},
            )
        if config.baseline_src is not None:
            servers["baseline"], key = start_gateway(
                stack, log_dir, sim.url, name="baseline", source=config.baseline_src
            )
            targets["baseline"] = Target(
                "baseline", servers["baseline"].url + "/v1/chat/completions",
                {"Authorization": f"Bearer {key}"},
            )
        if "litellm" in config.targets:
            if config.litellm:
                servers["litellm"], master_key = start_litellm(
                    stack, log_dir, config.litellm, sim.url, model_id
                )
                targets["litellm"] = Target(
                    "litellm", servers["litellm"].url + "/v1/chat/completions",
                    {"Authorization": f"Bearer {master_key}"},
                )
            else:
                skipped.append({"target": "litellm", "reason": "not installed: pass --litellm PATH"})
        if "passthrough" in servers:
            targets["passthrough"] = Target(
                "passthrough", servers["passthrough"].url + "/v1/chat/completions"
            )
        ordered = [targets[name] for name in TARGETS if name in targets]
        cells, sustain = run_on_uvloop(lambda: _measure(config, ordered, servers, model_id))
        processes = {name: proc_status(server.pid) for name, server in servers.items()}
    above = [rate for rate in config.rates if rate > config.litellm_max_rate]
    if "litellm" in targets and above:
        skipped.append({"target": "litellm", "rates": above,
                        "reason": f"above --litellm-max-rate {config.litellm_max_rate:g} req/s"})
    results = _results(cells, config)
    profiles = {}
    if config.profile_dir is not None:
        for name in targets:
            files = sorted(config.profile_dir.glob(f"{name}-*.txt"))
            if files:
                profiles[name] = profile.summarise(files)
    return {
        "benchmark": "overhead",
        "host": host_info(),
        "config": _config_dict(config),
        "targets": {name: {"url": target.url} for name, target in targets.items()},
        "results": results,
        "skipped": skipped,
        "sustained": sustain,
        "processes_kib": processes,
        "goals": _goals(results, sustain),
        "profiles": profiles,
    }


def _bodies(model_id: str, max_tokens: int, service_tier: str | None = None) -> tuple[bytes, bytes]:
    body: dict[str, Any] = {
        "model": model_id,
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": max_tokens,
    }
    if service_tier is not None:
        body["service_tier"] = service_tier
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    return orjson.dumps(body), orjson.dumps(stream)


def _py_spy() -> str:
    found = profile.find_py_spy()
    if found is None:
        raise BenchError("profiling needs py-spy: .venv/bin/pip install py-spy")
    return found


def _allowed(config: OverheadConfig, target: Target, rate: float) -> bool:
    return target.name != "litellm" or rate <= config.litellm_max_rate


async def _phase(
    gen: LoadGenerator, cells: dict[tuple[str, str, float], _Cell], target: Target,
    server: Server, phase: Phase, profile_dir: Path | None = None,
) -> PhaseResult:
    sampler = None
    if profile_dir is not None and target.name != "direct":
        out = profile_dir / f"{target.name}-{MODES[phase.stream]}-{phase.rate:g}-{phase.seed}.txt"
        sampler = await profile.record(_py_spy(), server.pid, phase.duration, out)
    cpu_before, own_before = cpu_seconds(server.pid), time.process_time()
    result = await gen.run(target, phase)
    if sampler is not None:
        await sampler.wait()
    cpu, own = cpu_seconds(server.pid) - cpu_before, time.process_time() - own_before
    key = (target.name, MODES[phase.stream], phase.rate)
    cell = cells.get(key)
    if cell is None:
        cells[key] = _Cell(result, cpu, own)
    else:
        cell.result.merge(result)
        cell.cpu += cpu
        cell.loadgen_cpu += own
    return result


async def _measure(
    config: OverheadConfig, targets: list[Target], servers: dict[str, Server], model_id: str
) -> tuple[dict[tuple[str, str, float], _Cell], dict[str, Any]]:
    gen = LoadGenerator(*_bodies(model_id, config.max_tokens, config.service_tier))
    cells: dict[tuple[str, str, float], _Cell] = {}
    seed = config.seed
    try:
        for mode in config.modes:
            for target in targets:
                await gen.run(target, Phase(50, config.warmup, mode == "stream", seed=seed))
        for mode in config.modes:
            for rate in config.rates:
                eligible = [t for t in targets if _allowed(config, t, rate)]
                for round_no in range(config.rounds):
                    shift = round_no % len(eligible)
                    for target in eligible[shift:] + eligible[:shift]:
                        seed += 1
                        phase = Phase(rate, config.phase_duration(rate), mode == "stream",
                                      config.arrivals, seed=seed)
                        await _phase(gen, cells, target, servers[target.name], phase,
                                     config.profile_dir)
        sustain = await _sustain(config, gen, targets, servers, seed)
    finally:
        await gen.close()
    return cells, sustain


async def _sustain(
    config: OverheadConfig, gen: LoadGenerator, targets: list[Target], servers: dict[str, Server],
    seed: int,
) -> dict[str, Any]:
    """The highest rate at which FlexServe's p99 overhead stays within the bound,
    and the same for the bare pass-through proxy (the floor) when it runs: each
    climbs the rates until it first fails; the search ends when both have."""
    by_name = {t.name: t for t in targets}
    report: dict[str, Any] = {
        "criterion": f"non-stream, p99 overhead <= {config.sustain_p99_ms:g} ms over the direct "
                     "call and no errors",
        "steps": [], "max_rate": None, "passthrough_max_rate": None, "limited_by": None,
    }
    if "flexserve" not in by_name or not config.sustain_rates:
        report["limited_by"] = "not run"
        return report
    climbing = [name for name in ("flexserve", "passthrough") if name in by_name]
    # Let the servers finish what the last (perhaps overloading) phase left them.
    await asyncio.sleep(config.warmup)
    for rate in config.sustain_rates:
        pair = [by_name["direct"], *(by_name[name] for name in climbing)]
        cells: dict[tuple[str, str, float], _Cell] = {}
        for round_no in range(config.sustain_rounds):
            shift = round_no % len(pair)
            for target in pair[shift:] + pair[:shift]:
                seed += 1
                phase = Phase(rate, config.phase_duration(rate), False, config.arrivals, seed=seed)
                await _phase(gen, cells, target, servers[target.name], phase)
        direct = cells[("direct", "non-stream", rate)].result
        step: dict[str, Any] = {
            "rate": rate,
            "direct_p99_ms": _ms_at(direct.latencies, 99),
            "direct_errors": dict(direct.errors),
            "generator_send_lag_p99_ms": _ms_at(direct.send_lags, 99),
        }
        failed = []
        for name in climbing:
            result = cells[(name, "non-stream", rate)].result
            overhead_p99 = _over(result.latencies, direct.latencies, 99)
            step[f"{name}_p99_ms"] = _ms_at(result.latencies, 99)
            step[f"{name}_overhead_p99_ms"] = overhead_p99
            step[f"{name}_errors"] = dict(result.errors)
            if result.num_errors or overhead_p99 is None or overhead_p99 > config.sustain_p99_ms:
                failed.append(name)
            else:
                report["max_rate" if name == "flexserve" else "passthrough_max_rate"] = rate
        report["steps"].append(step)
        if direct.num_errors or (step["generator_send_lag_p99_ms"] or 0) > config.sustain_p99_ms:
            report["limited_by"] = "load generator (the direct call itself did not keep up)"
            break
        if "flexserve" in failed:
            report["limited_by"] = "flexserve"
        climbing = [name for name in climbing if name not in failed]
        if not climbing:
            break
    else:
        report["limited_by"] = report["limited_by"] or "highest rate tried"
    return report


def _number(value: float) -> float | int:
    return int(value) if value == int(value) else value


def _per_request_us(cpu: float, num_sent: int) -> float | None:
    return round(cpu / num_sent * 1e6, 1) if num_sent else None


def _ms_at(values: list[float], q: float) -> float | None:
    return round(percentile(values, q) * 1000, 3) if values else None


def _over(values: list[float], floor: list[float], q: float) -> float | None:
    if not values or not floor:
        return None
    return round((percentile(values, q) - percentile(floor, q)) * 1000, 3)


def _results(cells: dict[tuple[str, str, float], _Cell], config: OverheadConfig) -> list[dict[str, Any]]:
    rows = []
    for mode in config.modes:
        for rate in config.rates:
            direct = cells.get(("direct", mode, rate))
            for name in TARGETS:
                cell = cells.get((name, mode, rate))
                if cell is None:
                    continue
                res = cell.result
                # Streams are judged at the first body byte (time to first token).
                primary = res.ttfb if mode == "stream" else res.latencies
                floor = (direct.result.ttfb if mode == "stream" else direct.result.latencies) if direct else []
                row: dict[str, Any] = {
                    "target": name, "mode": mode, "rate": rate,
                    "num_sent": res.num_sent, "num_ok": res.num_ok, "num_errors": res.num_errors,
                    "errors": dict(res.errors),
                    "achieved_rate": round(res.num_sent / res.send_time, 1) if res.send_time else None,
                    "latency_ms": summary_ms(res.latencies),
                    "ttfb_ms": summary_ms(res.ttfb) if mode == "stream" else None,
                    "overhead_ms": None if name == "direct" else {
                        "p50": _over(primary, floor, 50), "p99": _over(primary, floor, 99),
                    },
                    "send_lag_ms": summary_ms(res.send_lags),
                    "server_cpu_us_per_request": _per_request_us(cell.cpu, res.num_sent),
                    "loadgen_cpu_us_per_request": _per_request_us(cell.loadgen_cpu, res.num_sent),
                }
                rows.append(row)
    return rows


def _goals(results: list[dict[str, Any]], sustain: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, as measured in this run (reported, never asserted)."""
    def over(target: str, rate: float, q: str) -> float | None:
        for row in results:
            if row["target"] == target and row["rate"] == rate and row["mode"] == "non-stream":
                return row["overhead_ms"][q] if row["overhead_ms"] else None
        return None

    goals: dict[str, Any] = {}
    flex50, pass50, flex99 = over("flexserve", 200, "p50"), over("passthrough", 200, "p50"), over("flexserve", 200, "p99")
    if flex50 is not None and pass50 is not None and pass50 > 0:
        ratio = round(flex50 / pass50, 2)
        goals["p50_overhead_vs_passthrough_at_200"] = {"value": ratio, "goal": "<= 1.5", "met": ratio <= 1.5}
    if flex99 is not None:
        goals["p99_overhead_ms_at_200"] = {"value": flex99, "goal": "<= 5", "met": flex99 <= 5}
    lite50, flex50_20 = over("litellm", 20, "p50"), over("flexserve", 20, "p50")
    if lite50 is not None and flex50_20 is not None and flex50_20 > 0:
        ratio = round(lite50 / flex50_20, 1)
        goals["litellm_over_flexserve_p50_at_20"] = {"value": ratio, "goal": ">= 10", "met": ratio >= 10}
    if sustain.get("steps"):
        best = sustain["max_rate"]
        goals["sustained_rate"] = {"value": best, "goal": ">= 1000", "met": best is not None and best >= 1000}
    return goals


def _config_dict(config: OverheadConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


def format_report(report: dict[str, Any]) -> str:
    """The short table printed after a run."""
    header = ("mode", "rate", "target", "sent", "err", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms",
              "server cpu us/req", "loadgen cpu us/req")
    rows = []
    for row in report["results"]:
        measured = row["ttfb_ms"] if row["mode"] == "stream" else row["latency_ms"]
        over = row["overhead_ms"] or {}
        rows.append((
            row["mode"], _number(row["rate"]), row["target"], row["num_sent"], row["num_errors"],
            measured and measured["p50"], measured and measured["p99"], over.get("p50"),
            over.get("p99"), row["server_cpu_us_per_request"], row["loadgen_cpu_us_per_request"],
        ))
    lines = [format_table(header, rows), "(stream rows: time to first byte; +: over the direct call)"]
    sustain = report["sustained"]
    if sustain["steps"]:
        lines.append(f"sustained: {sustain['max_rate']} req/s ({sustain['criterion']}; "
                     f"limited by {sustain['limited_by']})")
        if any("passthrough_p99_ms" in step for step in sustain["steps"]):
            lines.append(f"sustained by the bare proxy: {sustain['passthrough_max_rate']} req/s")
    for skip in report["skipped"]:
        where = f" at {', '.join(f'{r:g}' for r in skip['rates'])} req/s" if "rates" in skip else ""
        lines.append(f"skipped {skip['target']}{where}: {skip['reason']}")
    for name, summary in report["profiles"].items():
        lines.append(f"profile {name}: {summary['num_busy']} busy samples; top Python frames:")
        lines += [f"  {entry['percent_of_busy']:5.1f}%  {entry['frame']}" for entry in summary["self"][:12]]
    for name, goal in report["goals"].items():
        lines.append(f"goal {name}: {goal['value']} (goal {goal['goal']}) {'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)
