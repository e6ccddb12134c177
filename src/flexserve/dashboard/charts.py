"""Charts as inline SVG, drawn on the server: no script, no library.

Each function takes plain numbers and returns one ``<svg>`` element; every
bar or point carries a ``<title>`` (the browser's tooltip) with its value.
Colours are fixed per tier so that every chart reads the same way.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from html import escape

TIER_COLOURS = {"priority": "#d62728", "default": "#1f77b4", "flex": "#2ca02c", "batch": "#9467bd"}
_FONT = 'font-family="sans-serif" font-size="11"'


def _svg(label: str, width: int, height: int, body: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(label)}" {_FONT}>{body}</svg>')


def day_label(unix_seconds: float) -> str:
    return datetime.datetime.fromtimestamp(unix_seconds, datetime.UTC).strftime("%Y-%m-%d")


def clock_label(unix_seconds: float) -> str:
    return datetime.datetime.fromtimestamp(unix_seconds, datetime.UTC).strftime("%H:%M")


def bars(label: str, points: Sequence[tuple[str, float]], show: Callable[[float], str],
         *, width: int = 720, height: int = 160, colour: str = "#1f77b4",
         goal: tuple[str, float] | None = None) -> str:
    """One bar per point (label, value), the first and last labels below;
    ``goal`` (its name, its value), such as an SLO, as a dashed line."""
    if not points:
        return ""
    peak = max(value for _, value in points)
    top = max(peak, goal[1] if goal else 0) or 1
    step = width / len(points)
    plot = height - 20
    drawn = []
    for i, (name, value) in enumerate(points):
        h = plot * value / top
        drawn.append(f'<rect x="{i * step + 1:.1f}" y="{plot - h:.1f}" width="{max(step - 2, 1):.1f}" '
                     f'height="{h:.1f}" fill="{colour}"><title>{escape(name)}: {escape(show(value))}'
                     f'</title></rect>')
    if goal is not None:
        y = plot - plot * goal[1] / top
        drawn.append(f'<line x1="0" y1="{y:.1f}" x2="{width}" y2="{y:.1f}" stroke="#d62728" '
                     f'stroke-dasharray="5 3"><title>{escape(goal[0])}: {escape(show(goal[1]))}</title></line>')
    drawn.append(f'<text x="0" y="{height - 4}">{escape(points[0][0])}</text>')
    drawn.append(f'<text x="{width}" y="{height - 4}" text-anchor="end">{escape(points[-1][0])}</text>')
    drawn.append(f'<text x="0" y="10">max {escape(show(peak))}</text>')
    return _svg(label, width, height, "".join(drawn))


def stacked(label: str, times: Sequence[float], series: Mapping[str, Sequence[float]],
            *, ceiling: Sequence[float] | None = None, width: int = 720, height: int = 160) -> str:
    """Series stacked over time as filled areas (in ``series``' order, the
    first at the bottom); ``ceiling`` (e.g. capacity) as a dashed line."""
    if len(times) < 2:
        return _svg(label, width, 24, '<text x="0" y="16">Not enough samples yet.</text>')
    plot = height - 20
    t0, t1 = times[0], times[-1]
    span = (t1 - t0) or 1.0
    totals = [sum(values[i] for values in series.values()) for i in range(len(times))]
    peak = max([*totals, *(ceiling or ())])
    top = peak or 1

    def x(t: float) -> float:
        return width * (t - t0) / span

    def y(v: float) -> float:
        return plot - plot * v / top

    drawn = []
    below = [0.0] * len(times)
    for name, values in series.items():
        above = [b + v for b, v in zip(below, values, strict=True)]
        edge = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(times, above, strict=True))
        back = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in reversed(list(zip(times, below, strict=True))))
        colour = TIER_COLOURS.get(name, "#7f7f7f")
        drawn.append(f'<polygon points="{edge} {back}" fill="{colour}" fill-opacity="0.8">'
                     f'<title>{escape(name)}: now {values[-1]:g}, peak {max(values):g}</title></polygon>')
        below = above
    if ceiling:
        line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(times, ceiling, strict=True))
        drawn.append(f'<polyline points="{line}" fill="none" stroke="#333" stroke-dasharray="4 3">'
                     f'<title>capacity {ceiling[-1]:g}</title></polyline>')
    drawn.append(f'<text x="0" y="{height - 4}">{clock_label(t0)}</text>')
    drawn.append(f'<text x="{width}" y="{height - 4}" text-anchor="end">{clock_label(t1)} UTC</text>')
    drawn.append(f'<text x="0" y="10">max {peak:g}</text>')
    return _svg(label, width, height, "".join(drawn))


def legend(names: Sequence[str]) -> str:
    """Tier colours as a line of small swatches."""
    items = "".join(
        f'<rect x="{i * 90}" y="2" width="10" height="10" fill="{TIER_COLOURS.get(n, "#7f7f7f")}"/>'
        f'<text x="{i * 90 + 14}" y="11">{escape(n)}</text>' for i, n in enumerate(names))
    return _svg("legend", 90 * len(names), 16, items)
