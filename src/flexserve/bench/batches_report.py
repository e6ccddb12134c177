"""The figures of ``flexserve bench batches`` and the Markdown report it prints.

Times are read by the client: a status's time is when a read of the batch
(every 0.05 to 0.25 s) first showed it, so each phase is known to about one
read interval; the server's own ``*_at`` stamps are whole seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from flexserve.bench.report import percentile

__all__ = ["FINAL", "batch_check", "phase_seconds", "rss_figures", "summarize_kill",
           "format_report"]

# The statuses of a batch that runs to its end, in order, and the final ones.
_ORDER = ("validating", "in_progress", "finalizing", "completed")
FINAL = ("completed", "failed", "expired", "cancelled")


def _first(times: Mapping[str, float], statuses: Sequence[str]) -> float | None:
    found = [times[s] for s in statuses if s in times]
    return min(found) if found else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def phase_seconds(times: Mapping[str, float], num_lines: int) -> dict[str, Any]:
    """Upload, validation, run and finalize seconds, and lines/s from create to the end.

    ``times``: ``began`` (upload sent), ``created`` (create sent) and the time
    each status was first seen. A status never seen (passed between two reads)
    ends where the next one seen begins.
    """
    created = times["created"]
    ended = _first(times, FINAL)
    running = _first(times, (*_ORDER[1:], *FINAL))
    finalizing = _first(times, (*_ORDER[2:], *FINAL))
    total = None if ended is None else ended - created
    run = None if running is None or finalizing is None else finalizing - running
    return {
        "lines": num_lines,
        "upload_s": _round(created - times["began"]),
        "validation_s": _round(None if running is None else running - created),
        "run_s": _round(run),
        "finalize_s": _round(None if ended is None or finalizing is None else ended - finalizing),
        "create_to_end_s": _round(total),
        "lines_per_s": _round(num_lines / total, 1) if total else None,
        "run_lines_per_s": _round(num_lines / run, 1) if run else None,
    }


def batch_check(batch: Mapping[str, Any], output: bytes, custom_ids: Sequence[str],
                ledger: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """Completed, every custom id once in the output file, one ``batch`` ledger
    row per output line. ``ledger``: the batch's usage rows (served tier,
    queue time in ms)."""
    found = Counter(orjson.loads(line)["custom_id"] for line in output.splitlines() if line.strip())
    num_output = sum(found.values())
    tiers = Counter(tier for tier, _ in ledger)
    check: dict[str, Any] = {
        "status": batch["status"],
        "output_lines": num_output,
        "failed_lines": batch["request_counts"]["failed"],
        "custom_ids_missing": len(set(custom_ids) - set(found)),
        "custom_ids_doubled": sum(1 for n in found.values() if n > 1),
        "ledger_rows_batch": tiers["batch"],
        "ledger_rows_other_tiers": len(ledger) - tiers["batch"],
        "queue_ms_p50_p99": [round(percentile([ms for _, ms in ledger], q)) for q in (50, 99)]
        if ledger else None,
    }
    check["passed"] = (
        check["status"] == "completed" and num_output == len(custom_ids)
        and check["custom_ids_missing"] == 0 and check["custom_ids_doubled"] == 0
        and check["ledger_rows_batch"] == num_output and check["ledger_rows_other_tiers"] == 0
    )
    return check


def rss_figures(samples: Sequence[tuple[float, str, float]], high_water_mib: float) -> dict[str, Any]:
    """Before (last idle sample), peak, after (last sample once the batch ended
    and the gateway idled), and the peak of each phase, in MiB.

    ``high_water_mark`` is the kernel's VmHWM or the highest sample, whichever
    is higher: Linux updates the mark lazily (on unmapping, not on every
    page freed), so a sampled peak can pass it (86.2 MiB sampled, 86.1
    MiB VmHWM, once)."""
    def last(phase: str) -> float | None:
        values = [v for _, p, v in samples if p == phase]
        return round(values[-1], 1) if values else None

    by_phase: dict[str, float] = {}
    for _, phase, value in samples:
        by_phase[phase] = max(value, by_phase.get(phase, 0.0))
    return {
        "before": last("before"),
        "peak": round(max((v for _, _, v in samples), default=0.0), 1),
        "after": last("after"),
        "high_water_mark": round(max([high_water_mib, *(v for _, _, v in samples)]), 1),
        "peak_by_phase": {phase: round(value, 1) for phase, value in by_phase.items()},
        "num_samples": len(samples),
    }


def summarize_kill(*, lines: int, threshold: int, at_kill: Mapping[str, Any],
                   times: Mapping[str, float], refusals: Mapping[int, int],
                   attempts: Mapping[int, int],
                   check: dict[str, Any], engine_requests: int) -> dict[str, Any]:
    """The restart's times, what was in flight at the kill, and what ran twice.

    ``at_kill``: the batch's ``completed`` count, its lines by state and the
    line numbers done, read from the database after the kill and before the
    restart. ``attempts``: each line's claims, read at the end.
    """
    killed, restarted = times["killed"], times["restarted"]

    def since(start: float, name: str) -> float | None:
        return _round(times[name] - start, 3) if name in times else None

    done_before = at_kill["done"]
    return {
        "lines": lines,
        "killed_after_completed": threshold,
        "completed_at_kill": at_kill["completed"],
        "in_flight_at_kill": at_kill["states"].get("running", 0),
        "kill_to_restart_s": since(killed, "restarted"),
        "restart_to_first_answer_s": since(restarted, "answered"),
        "restart_to_first_batch_read_s": since(restarted, "answered_ok"),
        "answers_before_first_batch_read": {str(status): n for status, n in refusals.items()},
        "restart_to_healthz_s": since(restarted, "healthy"),
        "restart_to_resumed_s": since(restarted, "resumed"),
        "kill_to_resumed_s": since(killed, "resumed"),
        "engine_requests_started": engine_requests,
        "engine_requests_beyond_lines": engine_requests - lines,
        "lines_claimed_more_than_once": sum(1 for n in attempts.values() if n > 1),
        "lines_done_before_kill_run_again": sum(1 for line in done_before if attempts.get(line, 0) > 1),
        "check": check,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _check(check: Mapping[str, Any]) -> str:
    verdict = "passed" if check["passed"] else "FAILED"
    return (f"check {verdict}: status {check['status']}, {check['output_lines']:,} output lines, "
            f"{check['custom_ids_missing']:,} custom_id missing, {check['custom_ids_doubled']:,} "
            f"twice, {check['ledger_rows_batch']:,} ledger rows on the batch tier "
            f"({check['ledger_rows_other_tiers']:,} on others); lines' queue time in the gateway "
            f"p50 · p99 {' · '.join(str(ms) for ms in check['queue_ms_p50_p99'] or ())} ms")


def format_report(report: Mapping[str, Any]) -> str:
    """The three sections as Markdown."""
    config, host = report["config"], report["host"]
    direct, batch = report["throughput"]["direct"], report["throughput"]["batch"]
    memory, kill = report["memory"], report["restart"]
    ratio = (batch["lines_per_s"] / direct["lines_per_s"]
             if batch["lines_per_s"] and direct["lines_per_s"] else None)
    out = [
        f"`{report['command'] or 'flexserve bench batches'}` — {host['measured_at']}, "
        f"{host['cpus']} CPUs, load average {' '.join(str(x) for x in host['load_average'])}; "
        f"sim engine `{config['profile']}`, {config['max_num_seqs']} sequences, "
        f"max_tokens {config['max_tokens']}.",
        "",
        "### Throughput",
        "",
        f"{batch['lines']:,} chat completions at speed {config['speed']:g}: one batch through "
        f"the gateway (upstream_capacity {config['max_num_seqs']}), and the same bodies sent "
        f"straight to the engine {config['max_num_seqs']} at a time.",
        "",
        *_table(["", "lines/s", "seconds", "engine running batch, mean", "engine CPU (s)",
                 "client or gateway CPU (s)", "errors"], [
            ["direct", direct["lines_per_s"], direct["seconds"], direct["engine_running_mean"],
             direct["engine_cpu_s"], direct["client_cpu_s"], sum(direct["errors"].values())],
            ["batch (create → completed)", batch["lines_per_s"], batch["create_to_end_s"],
             batch["engine_running_mean"], batch["engine_cpu_s"], batch["gateway_cpu_s"],
             batch["check"]["failed_lines"]],
        ]),
        "",
        f"- batch ÷ direct: {_cell(_round(ratio, 3))}",
        f"- batch phases (s): upload {_cell(batch['upload_s'])}, validation "
        f"{_cell(batch['validation_s'])}, run {_cell(batch['run_s'])} "
        f"({_cell(batch['run_lines_per_s'])} lines/s), finalize {_cell(batch['finalize_s'])}",
        f"- engine requests for the batch: {batch['engine_requests_started']:,}",
        f"- {_check(batch['check'])}",
        "",
        "### Memory",
        "",
        f"Gateway RSS (/proc/PID/status every 0.2 s) over one batch of {memory['lines']:,} lines "
        f"({memory['input_file_mib']} MiB), engine at speed {config['fast_speed']:g}.",
        "",
        *_table(["RSS (MiB)", "before", "peak", "after", "kernel high-water mark"],
                [["gateway", memory["rss_mib"]["before"], memory["rss_mib"]["peak"],
                  memory["rss_mib"]["after"], memory["rss_mib"]["high_water_mark"]]]),
        "",
        "- peak by phase (MiB): " + ", ".join(
            f"{phase} {_cell(value)}" for phase, value in memory["rss_mib"]["peak_by_phase"].items()),
        f"- phases (s): upload {_cell(memory['upload_s'])}, validation "
        f"{_cell(memory['validation_s'])}, run {_cell(memory['run_s'])} "
        f"({_cell(memory['run_lines_per_s'])} lines/s), finalize {_cell(memory['finalize_s'])}",
        f"- {_check(memory['check'])}",
        "",
        "### Restart after kill -9",
        "",
        f"A batch of {kill['lines']:,} lines, engine at speed {config['fast_speed']:g}; SIGKILL "
        f"once {kill['killed_after_completed']:,} lines were completed, restart on the same "
        "home and port.",
        "",
        *_table(["", "seconds"], [
            ["restart → first answer", kill["restart_to_first_answer_s"]],
            ["restart → GET /v1/batches/{id} 200", kill["restart_to_first_batch_read_s"]],
            ["restart → /healthz 200", kill["restart_to_healthz_s"]],
            ["restart → a line completed after the kill", kill["restart_to_resumed_s"]],
            ["kill → a line completed after the kill", kill["kill_to_resumed_s"]],
        ]),
        "",
        f"- at the kill: {kill['completed_at_kill']:,} lines completed, "
        f"{kill['in_flight_at_kill']:,} claimed and not recorded (running)",
        "- answers before the batch could be read: " + (", ".join(
            f"{n} × {status}" for status, n in kill["answers_before_first_batch_read"].items())
            or "none"),
        f"- engine requests {kill['engine_requests_started']:,} for {kill['lines']:,} lines: "
        f"{kill['engine_requests_beyond_lines']:,} beyond them; lines claimed more than once "
        f"{kill['lines_claimed_more_than_once']:,}, of them done before the kill "
        f"{kill['lines_done_before_kill_run_again']:,}",
        f"- {_check(kill['check'])}",
    ]
    return "\n".join(out)
