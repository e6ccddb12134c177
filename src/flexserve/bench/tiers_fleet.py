"""``flexserve bench tiers --gateways N --engines M``: the tiers benchmark on a fleet.

Scenarios D, A and B (``bench/tiers.py``) run twice in one command, on the
same seeded traffic per engine: first one gateway in front of one sim engine
(``1x1``), then N gateways in front of M sim engines of the same profile
(``NxM``), every gateway listing every engine and, when N > 1, sharing engine
slots, budgets and rate limits through one Redis (``flexserve.shared``; a
throwaway ``redis-server`` unless ``--redis``) and one database (a SQLite
file unless ``--db``).

- Traffic per engine is the same, and so are the default requests: M times
  the flex clients, and one engine's default requests (arrivals at ``load``
  of its D) over M times the window, which the single engine is sent in A
  and B over that time and the fleet in the window, the M spans of it laid
  over one another (``overlaid_schedule``), sent in turn to each gateway (D:
  to each engine, in the window). Each layout's p99 then ranks the same
  requests. Until 2026-12-04 the fleet was sent M copies of the single
  engine's requests in the window: its p99 ranked M times as many values
  (the 4th–5th highest of 340 against mostly the 2nd of 85), a higher point
  of the tail, which put its TPOT ratio 0.8 % higher in the median run
  (docs/benchmarks.md). Until 2026-12-03 it drew a schedule of its own at
  M times the rate, whose lengths differed from the single engine's by
  chance.
- Every engine's running and waiting sequences are read every 0.25 s; the
  most one engine held is reported against its capacity (the gateways'
  ``upstream_capacity``): above it, the gateways together sent an engine more
  than it runs at once.
- Ratios: each layout's B/A and B/D as ``bench tiers`` reports them; the
  fleet's against one gateway's; output tokens/s of NxM over 1x1 (goal:
  ≥ 0.9 × M).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from flexserve.bench.processes import create_key, start_redis
from flexserve.bench.tiers import (
    Scenario,
    TiersOptions,
    db_url_in,
    mixes,
    model_id,
    rate_for,
    run_scenario,
    start_gateway,
    start_sim_engine,
)
from flexserve.bench.tiers_load import Target
from flexserve.bench.tiers_report import format_ratios, format_table, goal_ratios
from flexserve.bench.traffic import FLEX_LENGTHS, SHAREGPT_LENGTHS, default_schedule, overlaid_schedule

_COUNTER = "vllm:generation_tokens_total"
# Output tokens/s of the fleet over one gateway and engine, per engine.
SCALING_GOAL = 0.9


def run_fleet(opts: TiersOptions, log_dir: Path, stack: ExitStack) -> dict[str, Any]:
    """Run both layouts; return the report (``host`` is added by the caller)."""
    default_mix, flex_mix = mixes(opts, SHAREGPT_LENGTHS, FLEX_LENGTHS)
    fleet = f"{opts.gateways}x{opts.engines}"
    redis = opts.redis
    if opts.gateways > 1 and redis is None:
        redis = start_redis(stack, log_dir)
    layouts: dict[str, Any] = {}
    one_engine: dict[str, Any] = {}
    for label, num_gateways, num_engines in (("1x1", 1, 1), (fleet, opts.gateways, opts.engines)):
        layouts[label] = _layout(opts, log_dir, label, num_gateways, num_engines,
                                 redis if num_gateways > 1 else None, one_engine)
    return {
        "benchmark": "tiers-fleet",
        "command": opts.command,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "setup": {
            "engine": "sim",
            "gateways": opts.gateways,
            "engines": opts.engines,
            "shared_state": "redis (throwaway)" if opts.redis is None else "redis (given)",
            "database": opts.db or "SQLite file",
            "profile": opts.profile,
            "speed": opts.speed,
            "max_num_seqs": opts.max_num_seqs,
            "cost_model": opts.cost_model,
            "duration_seconds": opts.duration,
            "warmup_seconds": opts.warmup_seconds,
            "seed": opts.seed,
            "load": opts.load,
            "flex_clients_per_engine": opts.num_flex_clients,
            "gateway_settings": dict(opts.settings),
            "default_lengths": default_mix.describe(),
            "flex_lengths": flex_mix.describe(),
        },
        "layouts": layouts,
        "ratios": fleet_ratios(layouts["1x1"]["scenarios"], layouts[fleet]["scenarios"],
                               opts.engines, opts.max_num_seqs),
    }


def _layout(opts: TiersOptions, log_dir: Path, label: str, num_gateways: int,
            num_engines: int, redis: str | None, one_engine: dict[str, Any]) -> dict[str, Any]:
    """D, A and B on ``num_gateways`` gateways in front of ``num_engines``
    engines. The first layout run (1x1) leaves its default requests and
    their rate in ``one_engine``; a later one sends ``num_engines`` copies."""
    default_mix, flex_mix = mixes(opts, SHAREGPT_LENGTHS, FLEX_LENGTHS)
    num_flex = opts.num_flex_clients * num_engines
    scenarios: dict[str, Any] = {}
    with ExitStack() as stack:
        engines = [start_sim_engine(stack, log_dir, opts, name=f"{label}-sim-engine-{i}")
                   for i in range(num_engines)]
        model = model_id(engines[0].url)
        engine_metrics = [f"{engine.url}/metrics" for engine in engines]
        direct = [Target(engine.url, model, default_tier=None, flex_tier=None) for engine in engines]
        d = Scenario("D", f"flex backlog straight to {num_engines} engine(s), no gateway", direct,
                     [], num_flex, True, engine_metrics, [], _COUNTER)
        scenarios["D"] = run_scenario(d, opts, flex_mix, engines)
        rate_engine, rate_wall = rate_for(opts, scenarios["D"]["engine_output_tps_engine"] or 0.0,
                                          default_mix)
        if one_engine:
            jobs = overlaid_schedule(one_engine["jobs"], opts.duration)
            rate_engine = one_engine["rate_engine"] * num_engines
            window = opts
        else:
            # A and B on one engine take the fleet's engines times as long:
            # its requests are the fleet's, each engine's rate the same.
            window = dataclasses.replace(opts, duration=opts.duration * opts.engines,
                                         warmup=opts.warmup_seconds)
            jobs = default_schedule(opts.seed, rate_wall, window.duration, default_mix)
            one_engine.update(jobs=jobs, rate_engine=rate_engine)
        homes = [log_dir / f"{label}-gateway-{i}-home" for i in range(num_gateways)]
        for home in homes:
            home.mkdir(exist_ok=True)
        db_url = opts.db or db_url_in(homes[0])
        key = create_key(db_url, homes[0], org=f"bench-{label}")
        gateways = [start_gateway(stack, log_dir, home, opts, tiers=True,
                                  upstreams=[engine.url for engine in engines],
                                  name=f"{label}-gateway-{i}", db_url=db_url, redis=redis)
                    for i, home in enumerate(homes)]
        targets = [Target(gateway.url, model, key) for gateway in gateways]
        gateway_metrics = [f"{gateway.url}/metrics" for gateway in gateways]
        for name, description, flex in (
                ("A", f"default alone, {num_gateways} tiered gateway(s)", 0),
                ("B", f"default + flex backlog, {num_gateways} tiered gateway(s)", num_flex)):
            sc = Scenario(name, description, targets, jobs, flex, False, engine_metrics,
                          gateway_metrics, _COUNTER, engine_capacity=opts.max_num_seqs)
            scenarios[name] = run_scenario(sc, window, flex_mix, [*engines, *gateways])
    return {
        "gateways": num_gateways,
        "engines": num_engines,
        "default_rate_per_engine_second": round(rate_engine, 3),
        "default_requests": len(jobs),
        "flex_clients": num_flex,
        "scenarios": scenarios,
        "ratios": goal_ratios(scenarios)[:3],
    }


def fleet_ratios(single: Mapping[str, Mapping[str, Any]], fleet: Mapping[str, Mapping[str, Any]],
                 num_engines: int, capacity: int) -> list[dict[str, Any]]:
    """The fleet's figures against one gateway and engine's, with each goal."""
    rows: list[dict[str, Any]] = []
    for metric, label in (("default_ttft_p99_ms", "default TTFT p99"),
                          ("default_tpot_p99_ms", "default TPOT p99")):
        one = _ratio(single["B"], single["A"], metric)
        many = _ratio(fleet["B"], fleet["A"], metric)
        rows.append({"ratio": f"B/A {label}: fleet, against 1x1's {_show(one)}", "value": many,
                     "goal": f"<= {_show(one)}",
                     "met": None if one is None or many is None else many <= one})
    rows.append(_row("B/D engine output tokens/s, fleet",
                     _ratio(fleet["B"], fleet["D"], "engine_output_tps_engine"), 0.85))
    for name in ("D", "B"):
        rows.append(_row(f"{name} engine output tokens/s, fleet over 1x1 (goal {SCALING_GOAL} x "
                         f"{num_engines} engines)",
                         _ratio(fleet[name], single[name], "engine_output_tps_engine"),
                         SCALING_GOAL * num_engines))
    most = max((fleet[n].get("engine_sequences_max") or 0 for n in ("A", "B")), default=0)
    rows.append({"ratio": f"most sequences in one engine, A and B (capacity {capacity})",
                 "value": most, "goal": f"<= {capacity}", "met": most <= capacity})
    return rows


def _ratio(top: Mapping[str, Any], bottom: Mapping[str, Any], metric: str) -> float | None:
    """``metric`` of one scenario over another's (None where either lacks it)."""
    num, den = top.get(metric), bottom.get(metric)
    return None if num is None or not den else round(num / den, 3)


def _row(label: str, value: float | None, goal: float) -> dict[str, Any]:
    return {"ratio": label, "value": value, "goal": f">= {goal:.2f}",
            "met": None if value is None else value >= goal}


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def render_fleet(report: Mapping[str, Any], markdown: bool = False) -> str:
    """Each layout's table and ratios, then the fleet's ratios."""
    parts = []
    for label, layout in report["layouts"].items():
        title = (f"{label}: {layout['gateways']} gateway(s), {layout['engines']} engine(s)")
        parts.append(("### " if markdown else "") + title + "\n\n"
                     + format_table(layout["scenarios"], layout["ratios"], markdown=markdown))
    parts.append(("### " if markdown else "") + "fleet against 1x1\n\n"
                 + format_ratios(report["ratios"], markdown=markdown))
    return "\n\n".join(parts)
