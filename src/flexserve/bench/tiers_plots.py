"""`bench tiers` drawn: an HTML page of SVG charts next to the JSON report.

- default TTFT and TPOT, as distributions (cumulative share of requests
  against milliseconds, log scale), one line per scenario;
- harvest against latency: each scenario's output tokens/s as a share of D
  against its default TTFT and TPOT p99 as multiples of A's, with the goals.

Plain SVG written here, no plotting library: the page opens offline, in any
browser, and needs nothing installed.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 20, 48
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22")
Point = tuple[float, float]


def _scale(low: float, high: float, start: float, end: float, log: bool) -> Any:
    if log:
        low, high = math.log10(low), math.log10(high)
    span = (high - low) or 1.0

    def to_pixels(value: float) -> float:
        value = math.log10(value) if log else value
        return start + (value - low) / span * (end - start)
    return to_pixels


def _ticks(low: float, high: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
                if low <= 10.0 ** e <= high] or [low, high]
    step = 10 ** math.floor(math.log10((high - low) or 1.0))
    if (high - low) / step < 4:
        step /= 2
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step) + 1)]


def _chart(title: str, x_label: str, y_label: str, lines: Mapping[str, Sequence[Point]], *,
           log_x: bool = False, markers: bool = False,
           x_rules: Sequence[float] = (), y_rules: Sequence[float] = ()) -> str:
    """One SVG chart: a line (or markers) per series, a legend on the right."""
    points = [p for series in lines.values() for p in series]
    if not points:
        return f"<p>{html.escape(title)}: nothing to draw.</p>"
    xs = [x for x, _ in points] + list(x_rules)
    ys = [y for _, y in points] + list(y_rules)
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(0.0, min(ys)), max(ys) * 1.05 or 1.0
    if log_x:
        x_low = max(x_low, 1e-3)
    elif x_low == x_high:
        x_low, x_high = x_low - 0.5, x_high + 0.5
    sx = _scale(x_low, x_high, LEFT, WIDTH - RIGHT, log_x)
    sy = _scale(y_low, y_high, HEIGHT - BOTTOM, TOP, False)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" '
           f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="11">',
           f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
           'fill="none" stroke="#999"/>']
    for tick in _ticks(x_low, x_high, log_x):
        x = sx(tick)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle">{tick:g}</text>')
    for tick in _ticks(y_low, y_high, False):
        y = sy(tick)
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for rule in x_rules:
        out.append(f'<line x1="{sx(rule):.1f}" x2="{sx(rule):.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" '
                   'stroke="#555" stroke-dasharray="4 3"/>')
    for rule in y_rules:
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(rule):.1f}" y2="{sy(rule):.1f}" '
                   'stroke="#555" stroke-dasharray="4 3"/>')
    for i, (name, series) in enumerate(lines.items()):
        color = COLORS[i % len(COLORS)]
        drawn = [(sx(x), sy(y)) for x, y in series if not log_x or x > 0]
        if markers:
            out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"><title>'
                       f'{html.escape(name)}</title></circle>' for x, y in drawn)
        elif drawn:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in drawn)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        legend_y = TOP + 14 * i + 8
        out.append(f'<rect x="{WIDTH - RIGHT + 10}" y="{legend_y - 8}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{WIDTH - RIGHT + 24}" y="{legend_y + 1}">{html.escape(name)}</text>')
    out.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 10}" text-anchor="middle">'
               f'{html.escape(x_label)}</text>'
               f'<text transform="translate(14 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
               f'text-anchor="middle">{html.escape(y_label)}</text></svg>')
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{''.join(out)}</figure>"


def cumulative(samples: Sequence[float], points: int = 200) -> list[Point]:
    """(value, share of samples at or below it): about ``points`` of them, the last included."""
    ordered = sorted(samples)
    n = len(ordered)
    if n == 0:
        return []
    step = max(1, n // points)
    picked = list(range(0, n, step)) + ([n - 1] if (n - 1) % step else [])
    return [(ordered[i], (i + 1) / n) for i in picked]


def harvest_points(ratios: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Point]]:
    """Per scenario with all three ratios: (output/D, TTFT p99/A), (output/D, TPOT p99/A)."""
    found: dict[str, dict[str, float]] = {}
    for row in ratios:
        name, value = str(row["ratio"]), row.get("value")
        if value is None or "/" not in name:
            continue
        scenario, rest = name.split("/", 1)
        if rest.startswith("A default TTFT p99"):
            found.setdefault(scenario, {})["ttft"] = float(value)
        elif rest.startswith("A default TPOT p99"):
            found.setdefault(scenario, {})["tpot"] = float(value)
        elif rest.startswith("D engine output tokens/s"):
            found.setdefault(scenario, {})["output"] = float(value)
    return {scenario: {"ttft": (v["output"], v["ttft"]), "tpot": (v["output"], v["tpot"])}
            for scenario, v in found.items() if {"ttft", "tpot", "output"} <= v.keys()}


def render(report: Mapping[str, Any]) -> str:
    scenarios: Mapping[str, Mapping[str, Any]] = report["scenarios"]
    ttft = {name: cumulative(s.get("default_ttft_samples_ms") or []) for name, s in scenarios.items()
            if s.get("default_ttft_samples_ms")}
    tpot = {name: cumulative(s.get("default_tpot_samples_ms") or []) for name, s in scenarios.items()
            if s.get("default_tpot_samples_ms")}
    harvest = harvest_points(report.get("ratios", []))
    charts = [
        _chart("Default TTFT, by scenario", "TTFT (ms, wall clock, log scale)", "share of requests", ttft,
               log_x=True),
        _chart("Default TPOT, by scenario", "TPOT (ms, wall clock, log scale)", "share of requests", tpot,
               log_x=True),
        _chart("Harvest against default TTFT p99 (goal: right of 0.85, below 1.10)",
               "output tokens/s / D's", "TTFT p99 / A's",
               {name: [points["ttft"]] for name, points in harvest.items()}, markers=True,
               x_rules=(0.85,), y_rules=(1.10,)),
        _chart("Harvest against default TPOT p99 (goal: right of 0.85, below 1.20)",
               "output tokens/s / D's", "TPOT p99 / A's",
               {name: [points["tpot"]] for name, points in harvest.items()}, markers=True,
               x_rules=(0.85,), y_rules=(1.20,)),
    ]
    command = html.escape(str(report.get("command", "")))
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>flexserve bench tiers</title></head><body style=\"font-family:sans-serif\">"
            f"<h1>flexserve bench tiers</h1><p><code>{command}</code></p>"
            f"<p>{html.escape(str(report.get('created', '')))}</p>" + "".join(charts) + "</body></html>\n")


def write_plots(report: Mapping[str, Any], json_path: Path) -> Path:
    """The charts of ``report`` as an HTML page beside its JSON (same name, .html)."""
    path = json_path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(report))
    return path
