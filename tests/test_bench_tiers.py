"""`flexserve bench tiers --quick` end to end against the sim engine: the report's shape.

A smoke run of a few seconds per scenario on a shared machine: this checks
that every scenario ran and counted something, never how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flexserve.bench.traffic import (
    FLEX_LENGTHS,
    SHAREGPT_LENGTHS,
    default_schedule,
    flex_jobs,
    overlaid_schedule,
)
from redis_server import RedisServer

FLEXSERVE = Path(sys.executable).parent / "flexserve"


def test_traffic_is_seeded_and_shaped() -> None:
    first = default_schedule(7, 3.0, 20.0, SHAREGPT_LENGTHS)
    again = default_schedule(7, 3.0, 20.0, SHAREGPT_LENGTHS)
    assert first == again and len(first) > 10
    assert all(0 <= job.at < 20.0 for job in first)
    assert [job.at for job in first] == sorted(job.at for job in first)
    jobs = flex_jobs(7, 0, FLEX_LENGTHS)
    flex = [next(jobs) for _ in range(50)]
    assert all(500 <= job.prompt_tokens <= 2000 and 50 <= job.output_tokens <= 300 for job in flex)
    mean_output = SHAREGPT_LENGTHS.expected_output()
    assert 300 < mean_output < 360  # ShareGPT's 338, after clipping


def test_a_fleet_is_sent_the_single_engines_requests_laid_over_its_window() -> None:
    """Four engines in 20 s get the requests one engine gets in 80 s: each
    once, at its time within its 20-s span, in time order, all in the
    window; so both layouts rank the same requests."""
    one = default_schedule(7, 3.0, 80.0, SHAREGPT_LENGTHS)
    four = overlaid_schedule(one, 20.0)
    assert overlaid_schedule(one, 20.0) == four
    assert len(four) == len(one) > 150
    assert sorted(job.seed for job in four) == sorted(job.seed for job in one)
    by_seed = {job.seed: job for job in one}
    for job in four:
        original = by_seed[job.seed]
        assert (job.prompt_tokens, job.output_tokens) == (original.prompt_tokens, original.output_tokens)
        assert job.at == pytest.approx(original.at - 20.0 * (original.at // 20.0))
        assert 0 <= job.at < 20.0
    assert [job.at for job in four] == sorted(job.at for job in four)
    assert [job.index for job in four] == list(range(len(four)))
    # Each span brings its own part: the window's first 20 s are not all of it.
    assert sum(job.at < 20.0 for job in one) < len(one) / 2


@pytest.mark.timeout(120)
def test_bench_tiers_quick_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "tiers.json"
    done = subprocess.run(
        [str(FLEXSERVE), "bench", "tiers", "--quick", "--max-num-seqs", "16", "--out", str(out)],
        capture_output=True, text=True, timeout=110, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    scenarios = report["scenarios"]
    assert set(scenarios) == {"A", "B", "C", "D", "E", "F"}
    for name in ("A", "B", "C", "E", "F"):
        assert scenarios[name]["default_sent"] > 0
        assert scenarios[name]["default_completed"] > 0
        assert scenarios[name]["default_ttft_p99_ms"] is not None
        assert scenarios[name]["default_tpot_p99_ms"] is not None
    for name in ("B", "C", "D", "E"):
        assert scenarios[name]["flex_completed"] > 0
    assert scenarios["A"]["flex_completed"] == 0
    # F's backlog is a batch: its lines ran, none of them as flex requests.
    assert scenarios["F"]["flex_completed"] == 0
    assert 0 < scenarios["F"]["batch_completed"] < scenarios["F"]["batch_lines"]
    for scenario in scenarios.values():
        assert scenario["engine_output_tokens"] > 0
        assert scenario["engine_preemptions"] is not None
        assert isinstance(scenario["disturbed"], list)
        assert "load-generator" in scenario["cpu_percent"]

    setup = report["setup"]
    assert setup["engine"] == "sim" and setup["max_num_seqs"] == 16
    assert setup["default_rate_per_engine_second"] > 0
    goals = {row["ratio"]: row for row in report["ratios"]}
    for label in ("B/A default TTFT p99", "B/A default TPOT p99", "B/D engine output tokens/s",
                  "F/A default TTFT p99 (batch backlog)"):
        assert goals[label]["value"] is not None and "goal" in goals[label]
    assert "B/A default TTFT p99" in done.stdout
    # Drawn beside the report, and announced as each scenario starts.
    page = out.with_suffix(".html").read_text()
    assert page.count("<svg") == 4 and ">B</text>" in page
    assert f"plots: {out.with_suffix('.html')}" in done.stderr
    assert "scenario B: started" in done.stderr


@pytest.mark.timeout(120)
def test_bench_tiers_variants_add_b_scenarios_with_their_settings(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    done = subprocess.run(
        [str(FLEXSERVE), "bench", "tiers", "--quick", "--max-num-seqs", "16", "--skip", "C",
         "--skip", "E", "--skip", "F", "--variant", "flex_headroom=0.9", "--split-prefill", "64",
         "--engine-policy", "64", "--kv-tokens", "200000", "--out", str(out)],
        capture_output=True, text=True, timeout=170, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    scenarios = report["scenarios"]
    assert set(scenarios) == {"A", "B", "D", "B1", "B-split", "P"}
    # P: E's traffic on an engine stepping by the flex-aware policy.
    assert report["setup"]["engine_policy_flex_prefill_budget"] == 64
    assert report["setup"]["kv_tokens"] == 200000
    assert scenarios["P"]["default_completed"] > 0 and scenarios["P"]["flex_completed"] > 0
    # Every engine step counted by its size, in the window.
    assert sum(scenarios["B"]["engine_step_tokens"].values()) > 0
    assert 0 <= scenarios["B"]["engine_steps_over_256_ratio"] <= 1
    # B-split: the gateway warmed flex prompts into the engine's prefix cache.
    assert report["setup"]["prefix_caching"] is True
    assert scenarios["B-split"]["settings"] == {"split_prefill_tokens": "64"}
    assert scenarios["B-split"]["split_prefill_warmups"] > 0
    assert scenarios["B-split"]["engine_prefix_cache_hit_ratio"] > 0
    assert scenarios["B"]["split_prefill_warmups"] == 0
    assert scenarios["B1"]["settings"] == {"flex_headroom": "0.9"}
    assert scenarios["B1"]["default_completed"] > 0
    # 90 % headroom leaves flex one slot of sixteen, and only while no default runs:
    # far fewer flex done than in B (perhaps none in a two-second window).
    assert scenarios["B1"]["flex_completed"] < scenarios["B"]["flex_completed"]
    goals = {row["ratio"]: row for row in report["ratios"]}
    assert goals["B1/A default TPOT p99"]["value"] is not None
    assert "B1: B with flex_headroom=0.9" in done.stdout
    assert goals["B-split/A default TTFT p99"]["value"] is not None


@pytest.mark.parametrize(("args", "message"), [
    (["--variant", "no_such_setting=1"], "unknown gateway setting(s): no_such_setting"),
    (["--engine", "embedded", "--skip", "C"], "--skip applies to the sim engine's scenarios only"),
    (["--redis", "redis://127.0.0.1:1"], "--redis and --db are for a fleet"),
    (["--engine", "embedded", "--kv-tokens", "4096"], "--kv-tokens sizes the sim engine's KV cache"),
])
def test_bench_tiers_refuses_what_it_cannot_run(tmp_path: Path, args: list[str], message: str) -> None:
    done = subprocess.run(
        [str(FLEXSERVE), "bench", "tiers", "--quick", *args, "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode != 0
    assert message in done.stderr


@pytest.mark.timeout(150)
def test_bench_tiers_on_a_fleet_runs_both_layouts_and_no_engine_gets_past_its_capacity(
    tmp_path: Path, redis_server: RedisServer,
) -> None:
    """Two gateways sharing Redis in front of two engines, against one in
    front of one: every scenario of both layouts ran, and through the
    gateways no engine ever held more than its 8 slots (straight to the
    engines, D's backlog of 16 clients each does: the watch sees it)."""
    out = tmp_path / "fleet.json"
    done = subprocess.run(
        [str(FLEXSERVE), "bench", "tiers", "--quick", "--max-num-seqs", "8", "--gateways", "2",
         "--engines", "2", "--redis", redis_server.url,
         "--set", f"redis_prefix=bench-{uuid.uuid4().hex[:8]}", "--out", str(out)],
        capture_output=True, text=True, timeout=170, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["layouts"]) == {"1x1", "2x2"}
    fleet = report["layouts"]["2x2"]
    assert (fleet["gateways"], fleet["engines"]) == (2, 2)
    assert fleet["flex_clients"] == 2 * report["layouts"]["1x1"]["flex_clients"]
    # The same default requests, the single engine's over twice the window.
    assert fleet["default_requests"] == report["layouts"]["1x1"]["default_requests"]
    single = report["layouts"]["1x1"]["scenarios"]
    window = fleet["scenarios"]["B"]["window_seconds"]
    assert single["B"]["window_seconds"] == pytest.approx(2 * window, rel=0.1)
    assert single["D"]["window_seconds"] == pytest.approx(window, rel=0.1)
    for layout in report["layouts"].values():
        scenarios = layout["scenarios"]
        assert set(scenarios) == {"A", "B", "D"}
        for name in ("A", "B"):
            assert scenarios[name]["default_completed"] > 0
            assert 0 < scenarios[name]["engine_sequences_max"] <= 8
        assert scenarios["B"]["flex_completed"] > 0
        assert scenarios["D"]["engine_sequences_max"] > 8
    assert {"2x2-gateway-0", "2x2-gateway-1", "2x2-sim-engine-1"} <= set(
        fleet["scenarios"]["B"]["cpu_percent"])
    rows = {row["ratio"]: row for row in report["ratios"]}
    assert rows["most sequences in one engine, A and B (capacity 8)"]["met"] is True
    scaling = rows["B engine output tokens/s, fleet over 1x1 (goal 0.9 x 2 engines)"]
    assert scaling["value"] is not None
    assert "fleet against 1x1" in done.stdout

