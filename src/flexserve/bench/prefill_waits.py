"""``flexserve bench prefill-waits LOG_DIR``: what default's first token waited behind.

Reads the request logs a ``bench tiers --log-dir`` run leaves (one JSON line
per request, ``observability/requests.py``: ``ts`` when it ended, with its
total, queue and first-token times and the replica that served it) and asks,
of each default request of scenario B, how many prompt tokens of other
requests on the same replica had been sent there and had had no output when
it arrived. A continuous-batching engine gives each step's token budget to
the sequences it admitted first, so a prompt waits out those chunks
(``scheduler/placement.py``).

Per layout (``1x1``, ``3x4``, …; every gateway's log of it read together)
it prints the TTFT of B's default requests by the tokens pending at their
arrival, how many found none, and for how many another replica had fewer.
Scenario B is told apart from A by its flex requests: the default requests
arriving between B's first and last flex arrival.

Times are those the gateway logged, to the millisecond; a request's arrival
is its end less its total time.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from flexserve.stats import percentile

# Bounds of the pending-token buckets the table shows: [0, 1), [1, 1000), …
BUCKETS = (0, 1, 1000, 3000)


@dataclass(frozen=True, slots=True)
class Logged:
    """One request as a gateway logged it, on one clock (seconds)."""

    tier: str
    replica: str
    arrived: float
    admitted: float
    first_output: float
    pending_tokens: int  # its prompt tokens not found in the engine's cache
    ttft_ms: float


def read_logs(paths: Iterable[Path]) -> list[Logged]:
    """The ``request`` lines of ``paths`` that had a first token."""
    out = []
    for path in paths:
        with path.open("rb") as lines:
            for line in lines:
                if b'"event": "request"' not in line and b'"event":"request"' not in line:
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # not a log record (a stray line of the process's stderr)
                if not isinstance(row, dict) or row.get("event") != "request" or row.get("ttft_ms") is None or not row.get("replica"):
                    continue
                out.append(_logged(row))
    return out


def _logged(row: dict[str, Any]) -> Logged:
    ended = datetime.datetime.fromisoformat(row["ts"].replace("Z", "+00:00")).timestamp()
    arrived = ended - row["total_time_ms"] / 1000
    return Logged(
        tier=row["served_tier"], replica=row["replica"], arrived=arrived,
        admitted=arrived + (row.get("queue_time_ms") or 0) / 1000,
        first_output=arrived + row["ttft_ms"] / 1000,
        pending_tokens=max(0, (row.get("prompt_tokens") or 0) - (row.get("cached_tokens") or 0)),
        ttft_ms=float(row["ttft_ms"]),
    )


@dataclass(frozen=True, slots=True)
class Arrival:
    """A default request of B and what it found."""

    ttft_ms: float
    pending_here: int
    pending_least: int  # the fewest on any replica of the layout


def b_defaults(requests: list[Logged]) -> list[Arrival]:
    """Scenario B's default requests, each with the prompt tokens pending at
    its arrival on its replica and on the replica with the fewest."""
    flex = [r for r in requests if r.tier == "flex"]
    if not flex:
        return []
    start, end = min(r.arrived for r in flex), max(r.arrived for r in flex)
    defaults = [r for r in requests if r.tier == "default" and start <= r.arrived <= end]
    by_replica: dict[str, list[Logged]] = defaultdict(list)
    for request in flex + defaults:
        by_replica[request.replica].append(request)

    def pending(replica: str, at: float, own: Logged) -> int:
        return sum(r.pending_tokens for r in by_replica[replica]
                   if r is not own and r.admitted <= at < r.first_output)

    out = []
    for request in defaults:
        here = pending(request.replica, request.arrived, request)
        least = min(pending(replica, request.arrived, request) for replica in by_replica)
        out.append(Arrival(request.ttft_ms, here, least))
    return out


def summarize(arrivals: list[Arrival]) -> dict[str, Any]:
    """TTFT by pending tokens at arrival, and the counts the docs quote."""
    rows = []
    for low, high in zip(BUCKETS, (*BUCKETS[1:], None), strict=True):
        ttfts = sorted(a.ttft_ms for a in arrivals if a.pending_here >= low and (high is None or a.pending_here < high))
        label = "none" if (low, high) == (0, 1) else f"{low}+" if high is None else f"{low}-{high - 1}"
        rows.append({
            "pending_tokens": label,
            "requests": len(ttfts),
            "ttft_p50_ms": percentile(ttfts, 50),
            "ttft_p90_ms": percentile(ttfts, 90),
            "ttft_max_ms": ttfts[-1] if ttfts else None,
        })
    return {
        "b_default_requests": len(arrivals),
        "found_none_pending": sum(1 for a in arrivals if a.pending_here == 0),
        "another_replica_had_fewer": sum(1 for a in arrivals if a.pending_least < a.pending_here),
        "by_pending_tokens": rows,
    }


def run(log_dir: Path) -> dict[str, dict[str, Any]]:
    """Each layout's summary, from the gateway logs in ``log_dir``."""
    layouts: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(log_dir.glob("*-gateway-*.log")):
        layouts[path.name.split("-gateway-")[0]].append(path)
    return {layout: summarize(b_defaults(read_logs(paths))) for layout, paths in layouts.items()}


def format_report(report: dict[str, dict[str, Any]]) -> str:
    """The summaries as text tables."""
    lines = []
    for layout, summary in report.items():
        lines.append(f"{layout}: {summary['b_default_requests']} default requests in B; "
                     f"{summary['found_none_pending']} found no prompt pending on their replica; "
                     f"for {summary['another_replica_had_fewer']} another replica had fewer pending")
        lines.append(f"  {'pending prompt tokens':<22}{'requests':>9}{'TTFT p50':>10}{'p90':>8}{'max':>8}  (ms)")
        for row in summary["by_pending_tokens"]:
            cells = [_ms(row[key]) for key in ("ttft_p50_ms", "ttft_p90_ms", "ttft_max_ms")]
            lines.append(f"  {row['pending_tokens']:<22}{row['requests']:>9}{cells[0]:>10}{cells[1]:>8}{cells[2]:>8}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
