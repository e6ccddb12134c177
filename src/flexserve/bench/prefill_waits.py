"""``flexserve bench prefill-waits LOG_DIR``: what default's first token waited
behind, and what its decode ran beside.

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

Then, of each such request's decode (from its first output to its end), the
mean number of other default and of flex sequences on its replica, and the
flex prompt tokens prefilled there per second (each flex prompt spread
evenly from its admission to its first output). A decode's time per token
is mostly a step's fixed cost and the prefill beside it: a default that
decodes beside more defaults has fewer flex sequences beside it (flex fills
what default leaves of a replica's room), and fewer flex prompts
(docs/benchmarks.md, "Tiers on a fleet").

Times are those the gateway logged, to the millisecond; a request's arrival
is its end less its total time.

Where the sim engines' logs hold their own times (``sim-engine
--log-requests``, which ``bench tiers --log-dir`` turns on), it also gives
default's time per output token in A and B as the engines' simulated clocks
measured it (``decode_s`` over the tokens after the first): the engines'
batches alone, without the host's or the gateways' delays. An engine's
default requests before its first flex one are A's, those after it B's.

And where they hold the engines' steps too (``sim-engine --log-steps``),
it reads each of B's default decodes against the steps it ran through (those
that began between its first and its last token): how many flex prompts
started prefilling on its engine a second, the share of its steps that
prefilled flex, and the flex prompt tokens those steps prefilled per output
token of its own; for all of them and for the slowest 1 %, whose time per
token is the p99 the benchmark's goal reads.
"""

from __future__ import annotations

import bisect
import datetime
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from flexserve.stats import percentile
from flexserve.tiers import ServiceTier

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
    ended: float
    pending_tokens: int  # its prompt tokens not found in the engine's cache
    output_tokens: int
    ttft_ms: float


def json_lines(path: Path, *markers: bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects of the lines of ``path`` holding any of ``markers``
    (other lines, and lines that are not JSON, skipped)."""
    with path.open("rb") as lines:
        for line in lines:
            if not any(marker in line for marker in markers):
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # not a log record (a stray line of the process's stderr)
            if isinstance(row, dict):
                yield row


def read_logs(paths: Iterable[Path]) -> list[Logged]:
    """The ``request`` lines of ``paths`` that had a first token."""
    out = []
    for path in paths:
        for row in json_lines(path, b'"event": "request"', b'"event":"request"'):
            if row.get("event") != "request" or row.get("ttft_ms") is None or not row.get("replica"):
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
        ended=ended,
        pending_tokens=max(0, (row.get("prompt_tokens") or 0) - (row.get("cached_tokens") or 0)),
        output_tokens=row.get("completion_tokens") or 0,
        ttft_ms=float(row["ttft_ms"]),
    )


@dataclass(frozen=True, slots=True)
class Arrival:
    """A default request of B and what it found."""

    ttft_ms: float
    pending_here: int
    pending_least: int  # the fewest on any replica of the layout


@dataclass(frozen=True, slots=True)
class Decode:
    """What a default request of B decoded beside on its replica (means over its decode)."""

    other_defaults: float
    flex: float
    flex_prefill_tokens_per_s: float


def _scenario_b(requests: list[Logged]) -> tuple[list[Logged], dict[str, list[Logged]]]:
    """Scenario B's default requests, and every request by replica."""
    flex = [r for r in requests if r.tier == "flex"]
    if not flex:
        return [], {}
    start, end = min(r.arrived for r in flex), max(r.arrived for r in flex)
    defaults = [r for r in requests if r.tier == "default" and start <= r.arrived <= end]
    by_replica: dict[str, list[Logged]] = defaultdict(list)
    for request in requests:
        by_replica[request.replica].append(request)
    return defaults, by_replica


def b_defaults(requests: list[Logged]) -> list[Arrival]:
    """Scenario B's default requests, each with the prompt tokens pending at
    its arrival on its replica and on the replica with the fewest."""
    defaults, by_replica = _scenario_b(requests)

    def pending(replica: str, at: float, own: Logged) -> int:
        return sum(r.pending_tokens for r in by_replica[replica]
                   if r is not own and r.admitted <= at < r.first_output)

    out = []
    for request in defaults:
        here = pending(request.replica, request.arrived, request)
        least = min(pending(replica, request.arrived, request) for replica in by_replica)
        out.append(Arrival(request.ttft_ms, here, least))
    return out


def b_decodes(requests: list[Logged]) -> list[Decode]:
    """Of scenario B's default requests with two or more output tokens, what
    each decoded beside on its replica."""
    defaults, by_replica = _scenario_b(requests)
    out = []
    for request in defaults:
        start, end = request.first_output, request.ended
        if request.output_tokens < 2 or end <= start:
            continue
        others = [r for r in by_replica[request.replica] if r is not request]
        beside_defaults = sum(_overlap(r.admitted, r.ended, start, end) for r in others if r.tier != "flex")
        beside_flex = sum(_overlap(r.admitted, r.ended, start, end) for r in others if r.tier == "flex")
        prefill = sum(r.pending_tokens * _overlap(r.admitted, r.first_output, start, end)
                      / (r.first_output - r.admitted)
                      for r in others if r.tier == "flex" and r.first_output > r.admitted)
        span = end - start
        out.append(Decode(beside_defaults / span, beside_flex / span, prefill / span))
    return out


def _overlap(start: float, end: float, low: float, high: float) -> float:
    """Seconds of [start, end] within [low, high]."""
    return max(0.0, min(end, high) - max(start, low))


def summarize(arrivals: list[Arrival], decodes: list[Decode]) -> dict[str, Any]:
    """TTFT by pending tokens at arrival, the counts the docs quote, and the
    means of what the decodes ran beside."""
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
        "decodes": len(decodes),
        "beside_decode_mean": {
            "other_defaults": _mean([d.other_defaults for d in decodes]),
            "flex": _mean([d.flex for d in decodes]),
            "flex_prefill_tokens_per_s": _mean([d.flex_prefill_tokens_per_s for d in decodes]),
        },
    }


def _mean(values: list[float], digits: int = 2) -> float | None:
    return round(sum(values) / len(values), digits) if values else None


def engine_tpots(paths: Iterable[Path]) -> dict[str, list[float]]:
    """Default's time per output token (ms, simulated clock) in A and in B,
    from the ``sim_request`` lines of the engines' logs ``paths``."""
    out: dict[str, list[float]] = {"A": [], "B": []}
    for path in paths:
        scenario = "A"
        for row in json_lines(path, b'"sim_request"'):
            if row.get("priority") == ServiceTier.FLEX.rank:
                scenario = "B"
            elif row.get("priority") == ServiceTier.DEFAULT.rank and row.get("output_tokens", 0) >= 2:
                out[scenario].append(row["decode_s"] / (row["output_tokens"] - 1) * 1000)
    return out


def summarize_engine(tpots: dict[str, list[float]]) -> dict[str, Any] | None:
    """p50 and p99 of each scenario's engine-time TPOT, and B/A at p99."""
    if not tpots["A"] or not tpots["B"]:
        return None
    out: dict[str, Any] = {name: {"requests": len(values), "p50_ms": percentile(values, 50),
                                  "p99_ms": percentile(values, 99)}
                           for name, values in tpots.items()}
    out["b_over_a_p99"] = round(out["B"]["p99_ms"] / out["A"]["p99_ms"], 3)
    return out


@dataclass(frozen=True, slots=True)
class EngineDecode:
    """One default decode of B on an engine's clock, and the steps it ran through."""

    tpot_ms: float
    flex_starts_per_s: float
    steps_with_flex_prefill: float  # a share of its steps
    flex_prefill_per_token: float  # flex prompt tokens over its own output tokens after the first


def engine_decodes(path: Path) -> list[EngineDecode]:
    """B's default decodes on one engine (``sim_request`` lines from its
    first flex arrival on), read against its ``sim_step`` lines."""
    steps: list[tuple[float, int]] = []  # (start, flex prompt tokens prefilled)
    requests: list[dict[str, Any]] = []
    flex_rank, default_rank = str(ServiceTier.FLEX.rank), ServiceTier.DEFAULT.rank
    for row in json_lines(path, b'"sim_step"', b'"sim_request"'):
        if row.get("event") == "sim_step":
            steps.append((row["start_s"], row["prefill_tokens"].get(flex_rank, 0)))
        elif row.get("event") == "sim_request" and "arrival_s" in row:
            requests.append(row)
    flex_arrivals = sorted(r["arrival_s"] for r in requests if r["priority"] == ServiceTier.FLEX.rank)
    if not flex_arrivals or not steps:
        return []
    steps.sort()
    starts = [start for start, _ in steps]
    out = []
    for request in requests:
        first, last = request["first_token_s"], request["last_token_s"]
        num_tokens = request["output_tokens"] - 1
        if (request["priority"] != default_rank or request["arrival_s"] < flex_arrivals[0]
                or num_tokens < 1 or last <= first):
            continue
        through = steps[bisect.bisect_left(starts, first):bisect.bisect_left(starts, last)]
        prefilled = [tokens for _, tokens in through if tokens]
        num_starts = bisect.bisect_right(flex_arrivals, last) - bisect.bisect_left(flex_arrivals, first)
        out.append(EngineDecode(
            tpot_ms=request["decode_s"] / num_tokens * 1000,
            flex_starts_per_s=num_starts / (last - first),
            steps_with_flex_prefill=len(prefilled) / len(through) if through else 0.0,
            flex_prefill_per_token=sum(prefilled) / num_tokens,
        ))
    return out


def summarize_decodes(decodes: list[EngineDecode]) -> dict[str, Any] | None:
    """Means over all of B's default decodes and over the slowest 1 % (one at least)."""
    if not decodes:
        return None
    slowest = sorted(decodes, key=lambda d: d.tpot_ms, reverse=True)[:max(1, math.ceil(len(decodes) / 100))]

    def means(group: list[EngineDecode]) -> dict[str, Any]:
        return {"decodes": len(group), "tpot_ms": _mean([d.tpot_ms for d in group]),
                "flex_starts_per_s": _mean([d.flex_starts_per_s for d in group]),
                "steps_with_flex_prefill": _mean([d.steps_with_flex_prefill for d in group], 3),
                "flex_prefill_per_token": _mean([d.flex_prefill_per_token for d in group])}

    return {"all": means(decodes), "slowest_1pct": means(slowest)}


def run(log_dir: Path) -> dict[str, dict[str, Any]]:
    """Each layout's summary, from the gateway logs in ``log_dir`` (and the
    sim engines', where they hold the engines' own times)."""
    layouts: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(log_dir.glob("*-gateway-*.log")):
        layouts[path.name.split("-gateway-")[0]].append(path)
    report = {}
    for layout, paths in layouts.items():
        requests = read_logs(paths)
        report[layout] = summarize(b_defaults(requests), b_decodes(requests))
        engine_logs = sorted(log_dir.glob(f"{layout}-sim-engine-*.log"))
        report[layout]["engine_tpot"] = summarize_engine(engine_tpots(engine_logs))
        report[layout]["engine_decodes"] = summarize_decodes(
            [decode for path in engine_logs for decode in engine_decodes(path)])
    return report


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
        beside = summary["beside_decode_mean"]
        if summary["decodes"]:
            lines.append(f"  beside each of {summary['decodes']} decodes, on average: "
                         f"{beside['other_defaults']:.1f} other default sequences, {beside['flex']:.1f} flex, "
                         f"{beside['flex_prefill_tokens_per_s']:,.0f} flex prompt tokens prefilled a second")
        engine = summary.get("engine_tpot")
        if engine:
            lines.append(f"  default TPOT on the engines' own clocks: A p50/p99 {engine['A']['p50_ms']:.2f}/"
                         f"{engine['A']['p99_ms']:.2f} ms, B {engine['B']['p50_ms']:.2f}/{engine['B']['p99_ms']:.2f} ms, "
                         f"B/A p99 {engine['b_over_a_p99']:.3f} ({engine['A']['requests']} and "
                         f"{engine['B']['requests']} requests)")
        decodes = summary.get("engine_decodes")
        if decodes:
            for name, label in (("all", "all"), ("slowest_1pct", "the slowest 1 %")):
                group = decodes[name]
                lines.append(f"  B's default decodes, {label} ({group['decodes']}): TPOT {group['tpot_ms']:.2f} ms; "
                             f"beside {group['flex_starts_per_s']:.2f} flex starts a second; "
                             f"{100 * group['steps_with_flex_prefill']:.1f} % of their steps prefilled flex, "
                             f"{group['flex_prefill_per_token']:.0f} flex prompt tokens per output token")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
