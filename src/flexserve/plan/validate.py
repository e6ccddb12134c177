"""``flexserve plan --validate REPORT``: replay a measured ``flexserve bench
tiers`` run through the planner and say how far its prediction is.

The report's setup (profile, cost model, batch size, prefix caching, the
default rate per engine second, flex clients, window and warm-up, seed) is
simulated as one window; its scenario B (default and the flex backlog
through the tiered gateway) is what was measured. Times compare in engine
time (the bench's ``*_engine_ms``: wall × the sim engine's speed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from flexserve.plan.simulate import Outcome, Replica, Window, ms, simulate
from flexserve.stats import percentile
from flexserve.scheduler.policy import SchedulerConfig


class NotATiersReport(ValueError):
    pass


def window_of(report: dict[str, Any]) -> tuple[Window, dict[str, Any]]:
    """The window that replays ``report``'s scenario B, and B's figures."""
    try:
        setup = report["setup"]
        measured = report["scenarios"]["B"]
        speed = float(setup["speed"])
        if setup.get("engine") != "sim":
            raise NotATiersReport("only runs on the sim engine can be replayed (its profile is the model)")
        kv = setup.get("kv_tokens")
        replica = Replica(setup["profile"], int(setup["max_num_seqs"]), setup.get("cost_model", "flat"),
                          kv if isinstance(kv, int) else None, bool(setup.get("prefix_caching")))
        window = Window(
            replica, float(setup["default_rate_per_engine_second"]),
            duration=float(setup["duration_seconds"]) * speed, warmup=float(setup["warmup_seconds"]) * speed,
            flex_clients=int(setup["flex_clients"]), seed=int(setup.get("seed", 0)),
            scheduler=SchedulerConfig(**_settings(setup.get("gateway_settings") or {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, NotATiersReport):
            raise
        raise NotATiersReport(f"not a `flexserve bench tiers` report with a scenario B: {exc!r}") from exc
    return window, {**measured, "_speed": speed}


def _settings(gateway: dict[str, Any]) -> dict[str, Any]:
    known = set(SchedulerConfig.__dataclass_fields__)
    return {k: v for k, v in gateway.items() if k in known}


def compare(report_path: Path) -> dict[str, Any]:
    window, measured = window_of(orjson.loads(report_path.read_bytes()))
    outcome = simulate(window)
    return comparison(window, measured, outcome)


def comparison(window: Window, measured: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    speed = measured["_speed"]
    engine_seconds = float(measured["window_seconds"]) * speed
    rows = {
        "flex_output_tps": (measured["flex_output_tokens"] / engine_seconds, outcome.flex_output_tps),
        "default_output_tps": (measured["default_output_tokens"] / engine_seconds, outcome.default_output_tps),
        "default_ttft_p99_ms": (measured["default_ttft_p99_engine_ms"],
                                ms(percentile(outcome.default_ttft, 99))),
        "default_tpot_p99_ms": (measured["default_tpot_p99_engine_ms"],
                                ms(percentile(outcome.default_tpot, 99))),
    }
    return {
        "profile": window.replica.profile_name, "cost_model": window.replica.cost_model,
        "default_rate": window.default_rate, "window_seconds": window.duration,
        "wall_seconds": round(outcome.wall_seconds, 2),
        "figures": {name: {"measured": _round(m), "predicted": _round(p),
                           "error": None if not m or p is None else round(p / m - 1, 4)}
                    for name, (m, p) in rows.items()},
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def lines(result: dict[str, Any]) -> list[str]:
    out = [f"{result['profile']} ({result['cost_model']}), default {result['default_rate']:g}/s, "
           f"{result['window_seconds']:g} s window, replayed in {result['wall_seconds']} s",
           "figure                 measured   predicted   error"]
    for name, row in result["figures"].items():
        error = "-" if row["error"] is None else f"{row['error']:+.1%}"
        out.append(f"{name:21s}  {row['measured'] or 0:9.2f}  {row['predicted'] or 0:10.2f}  {error:>6s}")
    return out
