"""The benchmarks end to end in their smoke modes: every report has its shape.

Run as the documented commands (real processes on loopback); no timing is
asserted, only that every target, mode and rate was measured.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from flexserve.bench.overhead import QUICK
from flexserve.bench.processes import BenchError, start_gateway
from flexserve.bench.report import format_table, percentile
from redis_server import RedisServer

FLEXSERVE = [sys.executable, "-c", "from flexserve.cli import main; main()"]


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*FLEXSERVE, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _positive(summary: dict[str, float] | None) -> None:
    assert summary is not None
    for name in ("p50", "p90", "p99", "max", "mean"):
        assert summary[name] > 0 and math.isfinite(summary[name]), (name, summary)


def test_overhead_quick_report(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    done = _run("bench", "overhead", "--quick", "--out", str(out))
    report: dict[str, Any] = json.loads(out.read_text())

    rows = {(r["target"], r["mode"], r["rate"]): r for r in report["results"]}
    for target in ("direct", "passthrough", "flexserve"):
        for mode in ("non-stream", "stream"):
            for rate in QUICK.rates:
                row = rows[(target, mode, rate)]
                assert row["num_sent"] > 0 and row["num_ok"] > 0
                assert row["num_errors"] == 0, row["errors"]
                _positive(row["latency_ms"])
                if mode == "stream":
                    _positive(row["ttfb_ms"])
                if target == "direct":
                    assert row["overhead_ms"] is None
                else:
                    assert all(math.isfinite(row["overhead_ms"][q]) for q in ("p50", "p99"))
                assert row["server_cpu_us_per_request"] >= 0
    assert not any(r["target"] == "litellm" for r in report["results"])
    assert any(s["target"] == "litellm" for s in report["skipped"])  # not installed here

    sustained = report["sustained"]
    assert [step["rate"] for step in sustained["steps"]] == list(QUICK.sustain_rates)
    assert sustained["limited_by"]
    assert "p99_overhead_ms_at_200" in report["goals"]
    assert report["host"]["cpus"] >= 1
    # The printed table names every target.
    for target in ("direct", "passthrough", "flexserve"):
        assert target in done.stdout


def test_flex_queue_quick_report(tmp_path: Path) -> None:
    out = tmp_path / "flex-queue.json"
    done = _run("bench", "flex-queue", "--quick", "--out", str(out))
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["num_waiting_reached"] == report["config"]["num_waiting"]
    assert report["answered_early"] == {}
    assert 0 < report["rss_mib"]["idle"] <= report["rss_mib"]["peak"]
    for stage in ("idle", "ramp", "waiting"):
        _positive(report["healthz_ms"][stage])
    assert report["loop_lag_ms"] is not None
    assert report["open_files_limit"]["gateway"] >= report["config"]["num_waiting"]
    assert "RSS" in done.stdout


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_table_aligns_numbers_right() -> None:
    table = format_table(("name", "ms"), [("a", 1.5), ("bb", None)])
    assert table.splitlines() == ["name    ms", "a     1.50", "bb       -"]


def test_hot_path_report(tmp_path: Path) -> None:
    out = tmp_path / "hot-path.json"
    _run("bench", "hot-path", "--requests", "50", "--repeats", "1", "--trials", "1",
         "--out", str(out))
    report: dict[str, Any] = json.loads(out.read_text())
    current = report["trees"]["current"]
    assert set(current["request_us"]) == {
        "non-stream/default", "non-stream/flex", "stream/default", "stream/flex"
    }
    assert all(value > 0 for value in current["request_us"].values())
    assert current["sse_relay_us"] > 0
    assert all(value >= 0 for value in report["parts_us"].values())


def test_shared_state_report(tmp_path: Path, redis_server: RedisServer) -> None:
    out = tmp_path / "shared-state.json"
    _run("bench", "shared-state", "--redis", redis_server.url, "--requests", "200",
         "--concurrency", "8", "--out", str(out))
    results: dict[str, Any] = json.loads(out.read_text())["results"]
    for kept in ("in process", "redis"):
        assert 0 < results[kept]["p50_us"] <= results[kept]["p99_us"]
        assert results[kept]["admissions_per_s"] > 0
    assert results["slot_renewal_us"]["p50_us"] > 0
    assert "| redis |" in out.with_suffix(".md").read_text()


def test_waits_quick_report(tmp_path: Path) -> None:
    out = tmp_path / "waits.json"
    done = _run("bench", "waits", "--quick", "--out", str(out))
    report: dict[str, Any] = json.loads(out.read_text())
    assert list(report["scenarios"]) == ["cold", "trickle-burst", "parallel"]
    assert report["setup"]["capacity_output_tokens_per_s"] > 0
    assert report["default"]["ok"] > 0
    deadlines = [f"{d:g}" for d in report["setup"]["deadlines_s"]]
    for name, scenario in report["scenarios"].items():
        first = scenario["first_attempts"]
        assert first["served"] > 0 and first["other"] == 0, (name, scenario["errors"])
        # Every served request was found in the ledger, so its wait is known.
        assert scenario["served_without_ledger_row"] == 0
        _positive(scenario["wait_ms"])
        accuracy = scenario["accuracy_status"]
        assert accuracy["n"] > 0 and 0 <= accuracy["within"] <= 1
        assert scenario["accuracy_header"] == "n/a" or scenario["accuracy_header"]["n"] > 0
        assert sorted(scenario["retry_after"]) == sorted(deadlines)
        assert scenario["completion_longest_deadline"]["sent"] > 0
        assert scenario["engine_load"]["batch_share"] is not None
        assert set(scenario["goals"]) >= {"status_within", "false_refusals", "completion_longest"}
        assert name in done.stdout
    assert "Retry-After" in done.stdout


def test_batches_quick_report(tmp_path: Path) -> None:
    out = tmp_path / "batches.json"
    done = _run("bench", "batches", "--quick", "--out", str(out))
    report: dict[str, Any] = json.loads(out.read_text())
    direct, batch = report["throughput"]["direct"], report["throughput"]["batch"]
    assert direct["ok"] == direct["requests"] and direct["errors"] == {}
    assert direct["lines_per_s"] > 0 and batch["lines_per_s"] > 0
    assert batch["engine_requests_started"] == batch["lines"]
    rss = report["memory"]["rss_mib"]
    assert 0 < rss["before"] <= rss["peak"] <= rss["high_water_mark"] and rss["after"] > 0
    kill = report["restart"]
    assert kill["killed_after_completed"] <= kill["completed_at_kill"] < kill["lines"]
    for name in ("restart_to_first_answer_s", "restart_to_healthz_s", "restart_to_resumed_s",
                 "kill_to_resumed_s"):
        assert kill[name] is not None and kill[name] > 0, name
    # Only lines in flight at the kill reach the engine again; none finished before it.
    assert kill["lines_done_before_kill_run_again"] == 0
    assert 0 <= kill["engine_requests_beyond_lines"] <= kill["in_flight_at_kill"]
    for section in (batch, report["memory"], kill):
        assert section["check"]["passed"], section["check"]
    markdown = out.with_suffix(".md").read_text()
    for heading in ("### Throughput", "### Memory", "### Restart after kill -9"):
        assert heading in markdown and heading in done.stdout
    assert "check passed" in markdown and "FAILED" not in markdown


def test_a_log_dir_that_holds_a_run_is_refused_not_reused(tmp_path: Path) -> None:
    """The gateway's home of an earlier run (its organizations, its ledger)
    would be mixed with the new run's: the bench says so and stops."""
    (tmp_path / "flexserve-home").mkdir()
    (tmp_path / "flexserve-home" / "flexserve.db").write_bytes(b"")
    with ExitStack() as stack, pytest.raises(BenchError, match="already holds a run"):
        start_gateway(stack, tmp_path, "http://127.0.0.1:9")
