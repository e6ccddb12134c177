"""Figures of ``flexserve bench tiers``: one scenario's summary, the goal ratios, the table.

Clocks. Client-side latencies (TTFT, TPOT) are wall-clock seconds measured
by the load generator; ``*_engine_ms`` multiplies them by the sim engine's
``speed`` to state them in engine time (what a real GPU would take). Engine
throughput is ``vllm:generation_tokens_total`` read at the start and end of
the measured window, divided by the window's wall seconds (``*_wall``) and
by ``speed`` (``*_engine``: engine time). ``pace`` checks that the sim
engine kept up with the wall clock: the engine's own mean inter-token
latency (simulated seconds, from its histogram) over the client's
(``sum(last - first) / sum(tokens - 1)`` of streamed requests, times
``speed``); 1.0 means the step loop ran on schedule, below 1 that the host
was too busy and engine-time figures derived from wall time are too low.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flexserve.bench.bootstrap import ratio_interval
from flexserve.bench.tiers_load import Outcome
from flexserve.stats import percentile

__all__ = ["GOALS", "Window", "disturbances", "format_table", "goal_ratios", "percentile",
           "summarize"]

# (name, numerator, denominator, metric, goal, "le" or "ge")
GOALS: tuple[tuple[str, str, str, str, float, str], ...] = (
    ("B/A default TTFT p99", "B", "A", "default_ttft_p99_ms", 1.10, "le"),
    ("B/A default TPOT p99", "B", "A", "default_tpot_p99_ms", 1.20, "le"),
    ("B/D engine output tokens/s", "B", "D", "engine_output_tps_engine", 0.85, "ge"),
    ("F/A default TTFT p99 (batch backlog)", "F", "A", "default_ttft_p99_ms", 1.10, "le"),
    ("F/A default TPOT p99 (batch backlog)", "F", "A", "default_tpot_p99_ms", 1.20, "le"),
    ("F/D engine output tokens/s (batch backlog)", "F", "D", "engine_output_tps_engine", 0.85,
     "ge"),
    ("C/A default TTFT p99 (contrast)", "C", "A", "default_ttft_p99_ms", 0.0, ""),
    ("C/A default TPOT p99 (contrast)", "C", "A", "default_tpot_p99_ms", 0.0, ""),
    ("C/D engine output tokens/s (contrast)", "C", "D", "engine_output_tps_engine", 0.0, ""),
    ("P/A default TTFT p99 (engine-side step policy)", "P", "A", "default_ttft_p99_ms", 1.10, "le"),
    ("P/A default TPOT p99 (engine-side step policy)", "P", "A", "default_tpot_p99_ms", 1.20, "le"),
    ("P/D engine output tokens/s (engine-side step policy)", "P", "D", "engine_output_tps_engine",
     0.85, "ge"),
    ("E/A default TTFT p99 (engine priority alone)", "E", "A", "default_ttft_p99_ms", 0.0, ""),
    ("E/A default TPOT p99 (engine priority alone)", "E", "A", "default_tpot_p99_ms", 0.0, ""),
    ("B/E engine output tokens/s (same mix)", "B", "E", "engine_output_tps_engine", 0.0, ""),
)


# Below this pace, above this send lateness, or on a host whose 1-minute load average
# exceeds this share of its CPUs, a scenario is flagged as disturbed.
MIN_PACE = 0.97
MAX_LATENESS_MS = 5.0
MAX_HOST_LOAD_PER_CPU = 0.5


@dataclass(frozen=True, slots=True)
class Window:
    """The measured window of one scenario and the metric samples at its ends."""

    start: float
    end: float
    speed: float
    engine_before: Mapping[str, float]
    engine_after: Mapping[str, float]
    gateway_before: Mapping[str, float]
    gateway_after: Mapping[str, float]
    # Sample counting the engine's output tokens (differs for the embedded engine).
    token_counter: str = "vllm:generation_tokens_total"

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def engine_delta(self, name: str) -> float | None:
        if name not in self.engine_after:
            return None
        return self.engine_after[name] - self.engine_before.get(name, 0.0)

    def gateway_delta(self, name: str) -> float | None:
        if name not in self.gateway_after:
            return None
        return self.gateway_after[name] - self.gateway_before.get(name, 0.0)


def _ms(value: float | None, factor: float = 1.0) -> float | None:
    return None if value is None else round(value * factor * 1000, 2)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def summarize(name: str, description: str, window: Window, defaults: Sequence[Outcome],
              num_defaults_sent: int, flex: Sequence[Outcome]) -> dict[str, Any]:
    """One scenario's figures, as stored in the JSON report."""
    speed = window.speed
    done = [o for o in defaults if o.ok]
    ttfts = [o.ttft for o in done if o.ttft is not None]
    tpots = [o.tpot for o in done if o.tpot is not None]
    in_window = [o for o in flex if window.start <= o.done_at <= window.end]
    flex_ok = [o for o in in_window if o.ok]
    # A labelled counter has no sample until its first increment: missing means 0 here.
    source = window.engine_after if window.engine_after else window.gateway_after
    tokens = None if not source else (
        (window.engine_delta(window.token_counter) if window.engine_after
         else window.gateway_delta(window.token_counter)) or 0.0)
    tps_wall = None if tokens is None else tokens / window.seconds
    out: dict[str, Any] = {
        "scenario": name,
        "description": description,
        "window_seconds": round(window.seconds, 3),
        "default_sent": num_defaults_sent,
        "default_completed": len(done),
        "default_failed": {str(k): v for k, v in _statuses(defaults).items()},
        "default_unfinished": num_defaults_sent - len(defaults),
        "default_ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "default_ttft_p90_ms": _ms(percentile(ttfts, 90)),
        "default_ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "default_ttft_mean_ms": _ms(sum(ttfts) / len(ttfts) if ttfts else None),
        "default_tpot_p50_ms": _ms(percentile(tpots, 50)),
        "default_tpot_p99_ms": _ms(percentile(tpots, 99)),
        # Every request's, for the ratios' confidence intervals (bootstrap.py).
        "default_ttft_samples_ms": [round(t * 1000, 3) for t in ttfts],
        "default_tpot_samples_ms": [round(t * 1000, 4) for t in tpots],
        "default_ttft_p50_engine_ms": _ms(percentile(ttfts, 50), speed),
        "default_ttft_p99_engine_ms": _ms(percentile(ttfts, 99), speed),
        "default_tpot_p50_engine_ms": _ms(percentile(tpots, 50), speed),
        "default_tpot_p99_engine_ms": _ms(percentile(tpots, 99), speed),
        "default_output_tokens": sum(o.completion_tokens for o in done),
        "default_send_lateness_p99_ms": _ms(percentile([o.lateness for o in defaults], 99)),
        "flex_completed": len(flex_ok),
        "flex_output_tokens": sum(o.completion_tokens for o in flex_ok),
        "flex_429": sum(1 for o in in_window if o.status == 429),
        "flex_failed_other": sum(1 for o in in_window if not o.ok and o.status != 429),
        "flex_retry_after_p50_s": _round(percentile(
            [o.retry_after for o in in_window if o.retry_after is not None], 50), 1),
        "engine_output_tokens": tokens,
        "engine_output_tps_wall": _round(tps_wall, 1),
        "engine_output_tps_engine": _round(None if tps_wall is None else tps_wall / speed, 1),
        "engine_preemptions": window.engine_delta("vllm:num_preemptions_total"),
        "gateway_preemptions": window.gateway_delta("flexserve_preemptions_total"),
        "gateway_flex_pauses": window.gateway_delta("flexserve_flex_pauses_total"),
        "gateway_flex_refused": window.gateway_delta("flexserve_flex_refused_total"),
        "split_prefill_warmups": window.gateway_delta("flexserve_split_prefill_warmups_total"),
        "split_prefill_misses": window.gateway_delta("flexserve_split_prefill_misses_total"),
        "engine_prefix_cache_hit_ratio": _hit_ratio(window),
        "engine_step_tokens": (steps := _step_histogram(window)),
        "engine_steps_over_256_ratio": _share_over(steps, 256),
        "pace": _pace(window, [*defaults, *flex]),
        "gateway_default_queue_ms_mean": _mean_ms(window, "flexserve_queue_time_seconds",
                                                  "tier=default"),
        "gateway_flex_queue_ms_mean": _mean_ms(window, "flexserve_queue_time_seconds",
                                               "tier=flex"),
    }
    return out


def _step_histogram(window: Window) -> dict[str, int] | None:
    """Engine steps in the window by tokens per step (bucket upper bound: steps),
    from the engine's ``vllm:iteration_tokens_total`` histogram; None without one."""
    prefix = "vllm:iteration_tokens_total_bucket|le="
    bounds = [k.removeprefix(prefix) for k in window.engine_after if k.startswith(prefix)]
    if not bounds:
        return None
    out: dict[str, int] = {}
    below = 0
    for bound in sorted(bounds, key=lambda b: float(b)):
        cumulative = int(window.engine_delta(prefix + bound) or 0)
        out[bound] = cumulative - below
        below = cumulative
    return out


def _share_over(steps: Mapping[str, int] | None, tokens: float) -> float | None:
    """The share of steps in ``steps`` (a step-size histogram) of more than ``tokens``."""
    if not steps or not sum(steps.values()):
        return None
    over = sum(n for bound, n in steps.items() if float(bound) > tokens)
    return round(over / sum(steps.values()), 4)


def _hit_ratio(window: Window) -> float | None:
    """The engine's prefix-cache hits over lookups in the window (None: it has no cache)."""
    queries = window.engine_delta("vllm:prefix_cache_queries_total")
    hits = window.engine_delta("vllm:prefix_cache_hits_total")
    return _round(hits / queries, 3) if queries and hits is not None else None


def disturbances(result: Mapping[str, Any]) -> list[str]:
    """Signs that the host, not the system under test, shaped a scenario's figures."""
    found = []
    pace = result.get("pace")
    if pace is not None and pace < MIN_PACE:
        found.append(f"the sim engine fell behind real time (pace {pace} < {MIN_PACE})")
    late = result.get("default_send_lateness_p99_ms")
    if late is not None and late > MAX_LATENESS_MS:
        found.append(f"the load generator sent late (p99 {late} ms > {MAX_LATENESS_MS} ms)")
    load = result.get("host_load_1m")
    limit = MAX_HOST_LOAD_PER_CPU * (os.cpu_count() or 1)
    if load and max(load.values()) > limit:
        found.append(f"the host was busy (1-minute load average {max(load.values())} > {limit:g})")
    return found


def _mean_ms(window: Window, histogram: str, label: str) -> float | None:
    """Mean of a gateway histogram's observations in the window, for one label value."""
    total = window.gateway_delta(f"{histogram}_sum|{label}")
    count = window.gateway_delta(f"{histogram}_count|{label}")
    return None if not count or total is None else round(total / count * 1000, 2)


def _statuses(outcomes: Sequence[Outcome]) -> dict[int | str, int]:
    counts: dict[int | str, int] = {}
    for o in outcomes:
        if not o.ok:
            key: int | str = o.status or "error"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _pace(window: Window, outcomes: Sequence[Outcome]) -> float | None:
    """Engine mean inter-token latency over the client's (in engine time); see module doc."""
    itl_sum = window.engine_delta("vllm:inter_token_latency_seconds_sum")
    itl_count = window.engine_delta("vllm:inter_token_latency_seconds_count")
    spans = gaps = 0.0
    for o in outcomes:
        if o.ok and o.first_token_at is not None and o.last_token_at is not None \
                and o.completion_tokens > 1 and o.last_token_at > o.first_token_at:
            spans += o.last_token_at - o.first_token_at
            gaps += o.completion_tokens - 1
    if not itl_sum or not itl_count or not gaps or not spans:
        return None
    return round((itl_sum / itl_count) / (spans / gaps * window.speed), 3)


def _variants(scenarios: Mapping[str, Any]) -> list[str]:
    """B1, B2, ...: the B scenarios run with --variant settings, in order; then B-split."""
    numbered = sorted((n for n in scenarios if n[:1] == "B" and n[1:].isdigit()), key=lambda n: int(n[1:]))
    return numbered + [n for n in scenarios if n == "B-split"]


# The per-request values behind a p99 metric, for its ratios' bootstrap intervals.
_SAMPLES = {"default_ttft_p99_ms": "default_ttft_samples_ms",
            "default_tpot_p99_ms": "default_tpot_samples_ms"}


def goal_ratios(scenarios: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The goal ratios between scenarios, with whether each goal is met; the
    three goals again for each variant of B."""
    goals = list(GOALS)
    for variant in _variants(scenarios):
        goals += [(label.replace("B/", f"{variant}/", 1), variant, bottom, metric, goal, sense)
                  for label, top, bottom, metric, goal, sense in GOALS[:3]]
    out = []
    for label, top, bottom, metric, goal, sense in goals:
        num = scenarios.get(top, {}).get(metric)
        den = scenarios.get(bottom, {}).get(metric)
        ratio = None if num is None or not den else round(num / den, 3)
        row: dict[str, Any] = {"ratio": label, "metric": metric, "value": ratio}
        samples = _SAMPLES.get(metric)
        if samples and ratio is not None:
            interval = ratio_interval(scenarios[top].get(samples) or (),
                                      scenarios[bottom].get(samples) or ())
            if interval is not None:
                row["ci95"] = [round(interval[0], 3), round(interval[1], 3)]
        if sense:
            row["goal"] = f"{'<=' if sense == 'le' else '>='} {goal:.2f}"
            row["met"] = None if ratio is None else (
                ratio <= goal if sense == "le" else ratio >= goal)
        out.append(row)
    return out


_ROWS: tuple[tuple[str, str], ...] = (
    ("default requests completed", "default_completed"),
    ("default TTFT p50 (ms, wall)", "default_ttft_p50_ms"),
    ("default TTFT p90 (ms, wall)", "default_ttft_p90_ms"),
    ("default TTFT p99 (ms, wall)", "default_ttft_p99_ms"),
    ("default TTFT mean (ms, wall)", "default_ttft_mean_ms"),
    ("default TPOT p50 (ms, wall)", "default_tpot_p50_ms"),
    ("default TPOT p99 (ms, wall)", "default_tpot_p99_ms"),
    ("default TTFT p99 (ms, engine time)", "default_ttft_p99_engine_ms"),
    ("default TPOT p99 (ms, engine time)", "default_tpot_p99_engine_ms"),
    ("engine output tokens/s (engine time)", "engine_output_tps_engine"),
    ("engine output tokens/s (wall)", "engine_output_tps_wall"),
    ("flex completed (in window)", "flex_completed"),
    ("flex 429s (in window)", "flex_429"),
    ("batch lines completed (by the window's end)", "batch_completed"),
    ("preemptions: gateway (aborts)", "gateway_preemptions"),
    ("preemptions: gateway (pauses)", "gateway_flex_pauses"),
    ("preemptions: engine", "engine_preemptions"),
    ("split prefill: warm-ups (gateway)", "split_prefill_warmups"),
    ("split prefill: pieces found evicted", "split_prefill_misses"),
    ("engine prefix-cache hit ratio", "engine_prefix_cache_hit_ratio"),
    ("engine steps of more than 256 tokens (share)", "engine_steps_over_256_ratio"),
    ("gateway queue time, default, mean (ms)", "gateway_default_queue_ms_mean"),
    ("sim clock pace (1 = on time)", "pace"),
    ("default send lateness p99 (ms)", "default_send_lateness_p99_ms"),
    ("engine sequences, most in one (running + waiting)", "engine_sequences_max"),
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"
    return str(value)


def format_table(scenarios: Mapping[str, Mapping[str, Any]], ratios: Sequence[Mapping[str, Any]],
                 markdown: bool = False) -> str:
    """The report as a text (or Markdown) table, then the goal ratios."""
    names = [n for n in ("A", "B", "F", "C", "D", "E", "P") if n in scenarios] + _variants(scenarios)
    header = ["", *names]
    rows = [[label, *(_cell(scenarios[n].get(key)) for n in names)] for label, key in _ROWS]
    variants = [f"{n}: {scenarios[n].get('description', '')}" for n in _variants(scenarios)]
    ratio_rows = _ratio_rows(ratios)
    warnings = [f"scenario {n} disturbed: {reason}"
                for n in names for reason in scenarios[n].get("disturbed") or ()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", "| ratio | value | goal | |", "| --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(row) + " |" for row in ratio_rows]
        lines += ["", *(f"- {w}" for w in warnings)] if warnings else []
        lines += ["", *(f"- {v}" for v in variants)] if variants else []
        return "\n".join(lines)
    text = _aligned([header, *rows]) + "\n\n" + _aligned([["ratio", "value", "goal", ""],
                                                           *ratio_rows])
    if variants:
        text += "\n\n" + "\n".join(variants)
    if warnings:
        text += "\n\n" + "\n".join(f"warning: {w}; rerun on a quieter host" for w in warnings)
    return text


def _ratio_rows(ratios: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[r["ratio"], _cell(r["value"]) + (f" ({r['ci95'][0]:g}-{r['ci95'][1]:g})" if r.get("ci95") else ""),
             r.get("goal", ""),
             "" if "met" not in r else ("-" if r["met"] is None else
                                        ("met" if r["met"] else "MISSED"))]
            for r in ratios]


def format_ratios(ratios: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """Ratios alone, as a text (or Markdown) table."""
    if markdown:
        return "\n".join(["| ratio | value | goal | |", "| --- | --- | --- | --- |",
                          *("| " + " | ".join(row) + " |" for row in _ratio_rows(ratios))])
    return _aligned([["ratio", "value", "goal", ""], *_ratio_rows(ratios)])


def _aligned(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    )
