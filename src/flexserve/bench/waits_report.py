"""The figures of ``flexserve bench waits``, per scenario, and the table it prints.

- **Estimate accuracy**: of the flex requests served, the share whose actual
  wait (the ledger's ``queue_time_ms``) is within ``tolerance`` (±25 %) of the
  estimate the client was given — the status estimate read just before
  sending, and the gateway's ``x-flex-estimated-wait`` header. An absolute
  floor (``tolerance_floor``) stands in for 25 % of a near-zero estimate, so
  that "no wait" estimated and a wait of a few milliseconds agree. A missing
  (null) estimate counts as a miss; a field the gateway does not send at all
  is reported as ``n/a``.
- **Retry-After**: of the refused requests retried after exactly their
  ``Retry-After`` with the same deadline, the share served, per deadline.
- **False refusals**: of the refused requests sent again at once with the
  server's own limit (probes), the share that then started within the
  deadline they had been refused for; and that share scaled to all flex
  requests sent (false per probed x refused / sent).
- **Completion** of the requests with the longest deadline (600 s), after
  their follow-ups.
- **Retry-After spread**: the values told to the requests refused on arrival
  (p10, p50, p90, how many distinct), and whether ``accepting`` in the status
  read before sending agreed with what the request then met.
- **Engine load**: the sim engine's running batch over its size, averaged
  over the scenario and over its burst (until the last first attempt was
  answered), and its output tokens/s over the capacity measured first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flexserve.bench.report import format_table, percentile, summary_ms
from flexserve.bench.waits_load import Attempt, FlexRequest, LoadSample

__all__ = ["GOALS", "scenario_figures", "format_report"]

# The goals: accuracy and Retry-After success at least, false refusals at most.
GOALS = {"within_tolerance": 0.90, "retry_accepted": 0.90, "false_refusals": 0.01,
         "completion_longest": 0.99, "engine_load_max": 0.85}


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _within(wait: float, estimate: float | None, tolerance: float, floor: float) -> bool:
    if estimate is None:
        return False
    return abs(wait - estimate) <= max(tolerance * estimate, floor)


def _accuracy(served: Sequence[Attempt], estimate_of: Callable[[Attempt], float | None],
              present: bool, tolerance: float, floor: float) -> dict[str, Any] | str:
    if not present:
        return "n/a"
    if not served:
        return {"n": 0, "within": None}
    within = sum(1 for a in served
                 if _within(a.queue_time or 0.0, estimate_of(a), tolerance, floor))
    nulls = sum(1 for a in served if estimate_of(a) is None)
    # actual / estimated: above 1, the estimate was too short.
    ratios = [(a.queue_time or 0.0) / e for a in served
              if (e := estimate_of(a)) is not None and e > 0]
    return {
        "n": len(served),
        "within": _share(within, len(served)),
        "null_estimates": nulls,
        "actual_over_estimate_p10_p50_p90": (
            [round(percentile(ratios, q), 3) for q in (10, 50, 90)] if ratios else None),
    }


def _retries(requests: Sequence[FlexRequest], by_request: Mapping[int, list[Attempt]],
             deadlines: Sequence[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for deadline in deadlines:
        refused = retried = served = given_up = skipped = 0
        for request in requests:
            attempts = by_request.get(request.index, [])
            if request.deadline != deadline or request.follow_up != "retry" or not attempts:
                continue
            if not attempts[0].refused_on_arrival:
                continue
            refused += 1
            if len(attempts) < 2:
                skipped += 1 if attempts[0].retry_skipped else 0
                continue
            retried += 1
            first_retry = attempts[1]
            served += first_retry.served
            given_up += first_retry.given_up_in_queue
        out[f"{deadline:g}"] = {"refused": refused, "retried": retried, "served": served,
                                "queued_then_refused": given_up,
                                "not_retried_retry_after_over_cap": skipped,
                                "share": _share(served, retried)}
    return out


def _false_refusals(requests: Sequence[FlexRequest], by_request: Mapping[int, list[Attempt]],
                    num_refused: int) -> dict[str, Any]:
    probed = false = undetermined = 0
    for request in requests:
        attempts = by_request.get(request.index, [])
        probes = [a for a in attempts if a.kind == "probe"]
        if not probes:
            continue
        probed += 1
        probe = probes[0]
        if probe.served and probe.queue_time is not None:
            false += probe.queue_time <= request.deadline
        else:
            undetermined += 1
    share = _share(false, probed)
    return {"probed": probed, "false": false, "undetermined": undetermined,
            "share_of_probed": share,
            "share_of_sent": None if share is None or not requests
            else round(share * num_refused / len(requests), 4)}


def _spread(values: Sequence[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"n": len(values), "distinct": len(set(values)),
            "p10_p50_p90": [round(percentile(values, q), 1) for q in (10, 50, 90)]}


def _load(samples: Sequence[LoadSample], began: float, ended: float, max_num_seqs: int,
          capacity_tps: float) -> dict[str, Any]:
    inside = [s for s in samples if began <= s.at <= ended]
    if len(inside) < 2:
        return {"batch_share": None, "token_share": None, "max_flex_waiting": None}
    batch = sum(s.running for s in inside) / len(inside) / max_num_seqs
    seconds = inside[-1].at - inside[0].at
    tps = (inside[-1].generation_tokens - inside[0].generation_tokens) / seconds if seconds else 0.0
    return {"batch_share": round(batch, 3),
            "token_share": round(tps / capacity_tps, 3) if capacity_tps else None,
            "output_tokens_per_s": round(tps, 1),
            "max_flex_waiting": int(max(s.flex_waiting for s in inside))}


def scenario_figures(requests: Sequence[FlexRequest], attempts: Sequence[Attempt],
                     samples: Sequence[LoadSample], window: tuple[float, float], *,
                     deadlines: Sequence[float], max_num_seqs: int, capacity_tps: float,
                     tolerance: float, tolerance_floor: float) -> dict[str, Any]:
    """Every figure of one scenario."""
    by_request: dict[int, list[Attempt]] = {}
    for attempt in attempts:
        by_request.setdefault(attempt.request, []).append(attempt)
    firsts = [a for a in attempts if a.kind == "first"]
    num_refused = sum(a.refused_on_arrival for a in firsts)
    served = [a for a in attempts if a.served and a.queue_time is not None]
    header_present = any(a.header_estimate is not None for a in attempts)
    p90_present = any(a.status_has_p90 for a in attempts)
    waits = [a.queue_time or 0.0 for a in served]
    cross = [a.ttfb - (a.queue_time or 0.0) for a in served if a.ttfb is not None]
    longest = max(deadlines)
    longest_requests = [r for r in requests if r.deadline == longest]
    completed_longest = sum(
        1 for r in longest_requests if any(a.completed for a in by_request.get(r.index, [])))
    figures: dict[str, Any] = {
        "flex_requests": len(requests),
        "attempts": len(attempts),
        "first_attempts": {
            "served": sum(a.served for a in firsts),
            "refused_on_arrival": num_refused,
            "queued_then_refused": sum(a.given_up_in_queue for a in firsts),
            "other": sum(1 for a in firsts if a.status not in (200, 429)),
        },
        "served_without_ledger_row": sum(1 for a in attempts if a.served and a.queue_time is None),
        "wait_ms": summary_ms(waits),
        "accuracy_status": _accuracy(served, lambda a: a.status_estimate, True, tolerance,
                                     tolerance_floor),
        "accuracy_header": _accuracy(served, lambda a: a.header_estimate, header_present,
                                     tolerance, tolerance_floor),
        "within_status_p90": (_share(sum(1 for a in served if a.status_p90 is not None
                                         and (a.queue_time or 0.0) <= a.status_p90), len(served))
                              if p90_present else "n/a"),
        "retry_after": _retries(requests, by_request, deadlines),
        "retry_after_told_s": _spread([a.retry_after for a in attempts
                                       if a.refused_on_arrival and a.retry_after is not None]),
        "status_accepting_agreed": _share(
            sum(1 for a in firsts if a.status_accepting is not None
                and a.status_accepting != a.refused_on_arrival),
            sum(1 for a in firsts if a.status_accepting is not None)),
        "false_refusals": _false_refusals(requests, by_request, num_refused),
        "completion_longest_deadline": {
            "deadline_s": longest, "sent": len(longest_requests), "completed": completed_longest,
            "share": _share(completed_longest, len(longest_requests))},
        "engine_load": _load(samples, window[0], window[1], max_num_seqs, capacity_tps),
        # Until the last first attempt was answered: the burst's own drain, without the
        # tail of retries that may follow it.
        "engine_load_burst": _load(samples, window[0],
                                   max((a.done_at for a in firsts), default=window[1]),
                                   max_num_seqs, capacity_tps),
        "ttfb_minus_ledger_wait_ms": summary_ms(cross) if cross else None,
        "errors": sorted({(a.error or "")[:120] for a in attempts
                          if a.status not in (200, 429) or (a.served and not a.completed)})[:5],
    }
    figures["goals"] = _goals(figures)
    return figures


def _goals(f: Mapping[str, Any]) -> dict[str, bool | None]:
    def at_least(value: Any, goal: float) -> bool | None:
        return None if not isinstance(value, int | float) else value >= goal

    retry_shares = [v["share"] for v in f["retry_after"].values() if v["share"] is not None]
    false_share = f["false_refusals"]["share_of_sent"]
    load = f["engine_load_burst"]["batch_share"]
    return {
        "status_within": at_least(_get(f["accuracy_status"]), GOALS["within_tolerance"]),
        "header_within": at_least(_get(f["accuracy_header"]), GOALS["within_tolerance"]),
        "retry_accepted_every_deadline": (None if not retry_shares
                                          else min(retry_shares) >= GOALS["retry_accepted"]),
        "false_refusals": None if false_share is None else false_share <= GOALS["false_refusals"],
        "completion_longest": at_least(f["completion_longest_deadline"]["share"],
                                       GOALS["completion_longest"]),
        "engine_load_within": None if load is None else load <= GOALS["engine_load_max"],
    }


def _get(accuracy: Any) -> float | None:
    return accuracy.get("within") if isinstance(accuracy, dict) else None


def _pct(value: Any) -> object:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return f"{100 * value:.1f}%"


def format_report(report: Mapping[str, Any]) -> str:
    """Two tables: the goals per scenario, then Retry-After success per deadline."""
    rows = []
    for name, f in report["scenarios"].items():
        first = f["first_attempts"]
        rows.append([
            name, f["flex_requests"], first["served"], first["refused_on_arrival"],
            first["queued_then_refused"], _pct(_get(f["accuracy_status"]) if isinstance(
                f["accuracy_status"], dict) else f["accuracy_status"]),
            _pct(_get(f["accuracy_header"]) if isinstance(f["accuracy_header"], dict)
                 else f["accuracy_header"]),
            _pct(f["false_refusals"]["share_of_sent"]),
            _pct(f["completion_longest_deadline"]["share"]),
            _pct(f["engine_load_burst"]["batch_share"]), f["engine_load"]["max_flex_waiting"],
        ])
    main = format_table(["scenario", "flex", "served", "refused", "expired", "±25% status",
                         "±25% header", "false ref.", "done 600s", "burst load", "max queue"], rows)
    deadlines = list(report["setup"]["deadlines_s"])
    retry_rows = []
    for name, f in report["scenarios"].items():
        cells: list[object] = [name]
        for deadline in deadlines:
            entry = f["retry_after"][f"{deadline:g}"]
            cells.append(f"{_pct(entry['share']) or '-'} of {entry['retried']}"
                         if entry["retried"] else "-")
        retry_rows.append(cells)
    retry = format_table(["Retry-After ok", *[f"{d:g} s" for d in deadlines]], retry_rows)
    return f"{main}\n\n{retry}"
