"""`flexserve bench prefill-waits`: what each default request of B found
pending on its replica, read from request logs written as the gateway
writes them."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexserve.bench.prefill_waits import b_decodes, b_defaults, read_logs, run

FLEXSERVE = Path(sys.executable).parent / "flexserve"
BASE = datetime.datetime(2026, 12, 3, 20, 0, tzinfo=datetime.UTC)


def line(tier: str, replica: str, arrived: float, ttft_ms: int, total_ms: int,
         prompt: int, cached: int = 0, queue_ms: int = 0) -> str:
    """A request line as ``observability/requests.py`` logs it: ``ts`` is its end."""
    ended = BASE + datetime.timedelta(seconds=arrived, milliseconds=total_ms)
    return json.dumps({
        "ts": ended.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": "info",
        "logger": "flexserve.requests", "msg": "request", "event": "request",
        "requested_tier": tier, "served_tier": tier, "replica": replica, "status": "completed",
        "queue_time_ms": queue_ms, "ttft_ms": ttft_ms, "total_time_ms": total_ms,
        "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": 10,
    })


def write_fleet(log_dir: Path) -> None:
    """Two gateways' logs of one layout. On r1 a flex prompt of 2,000 tokens
    (500 cached) has no output from 0 s to 0.5 s; on r2 one's output starts
    at 0.01 s. A default arrives on r1 at 0.2 s (1,500 tokens pending there,
    none on r2), another on r2 at 0.3 s, and one in A, before any flex."""
    first = [
        line("default", "r1", -5.0, 12, 400, 50),
        line("flex", "r1", 0.0, 500, 1000, 2000, cached=500),
        json.dumps({"ts": "2026-12-03T20:00:01.000Z", "event": "flex_refused", "retry_after_s": 1}),
        line("default", "r1", 0.2, 60, 900, 40),
    ]
    second = [
        line("flex", "r2", 0.0, 10, 2000, 1500),
        line("default", "r2", 0.3, 15, 700, 30),
        line("flex", "r2", 3.0, 10, 500, 700),
    ]
    (log_dir / "3x4-gateway-0.log").write_text("\n".join(first) + "\n")
    (log_dir / "3x4-gateway-1.log").write_text("\n".join(second) + "\n")


def test_each_default_of_b_is_read_with_the_prompt_tokens_pending_on_its_replica_and_the_fewest(tmp_path: Path) -> None:
    write_fleet(tmp_path)
    arrivals = sorted(b_defaults(read_logs(sorted(tmp_path.glob("*.log")))), key=lambda a: a.ttft_ms)
    assert [(a.ttft_ms, a.pending_here, a.pending_least) for a in arrivals] == [(15, 0, 0), (60, 1500, 0)]
    summary = run(tmp_path)["3x4"]
    assert (summary["b_default_requests"], summary["found_none_pending"],
            summary["another_replica_had_fewer"]) == (2, 1, 1)
    rows = {row["pending_tokens"]: (row["requests"], row["ttft_p50_ms"]) for row in summary["by_pending_tokens"]}
    assert rows == {"none": (1, 15), "1-999": (0, None), "1000-2999": (1, 60), "3000+": (0, None)}


def test_each_default_decode_of_b_is_read_with_the_sequences_and_flex_prefill_beside_it(tmp_path: Path) -> None:
    """r1's default decodes from 0.26 s to 1.1 s: beside the flex run until
    1.0 s (0.74 of 0.84 s), whose 1,500 uncached prompt tokens, spread over
    0 to 0.5 s, fall 0.24 s into it (720 tokens); A's default ended long
    before. r2's decodes from 0.315 s to 1.0 s beside a flex run whose
    prompt was prefilled by 0.01 s."""
    write_fleet(tmp_path)
    decodes = sorted(b_decodes(read_logs(sorted(tmp_path.glob("*.log")))), key=lambda d: -d.flex_prefill_tokens_per_s)
    assert len(decodes) == 2
    assert decodes[0].other_defaults == 0
    assert decodes[0].flex == pytest.approx(0.74 / 0.84, abs=1e-3)
    assert decodes[0].flex_prefill_tokens_per_s == pytest.approx(720 / 0.84, rel=1e-3)
    assert (decodes[1].other_defaults, decodes[1].flex_prefill_tokens_per_s) == (0, 0)
    assert decodes[1].flex == pytest.approx(1.0)
    beside = run(tmp_path)["3x4"]["beside_decode_mean"]
    assert beside["flex_prefill_tokens_per_s"] == pytest.approx(720 / 0.84 / 2, abs=0.01)


def test_the_engines_own_times_give_defaults_tpot_in_a_and_b(tmp_path: Path) -> None:
    """Each engine's default requests before its first flex one are A's,
    after it B's; D's (priority 0), one-token outputs and other lines are
    left out. Engine 0 has A's 5 ms and B's 8 ms, engine 1 A's 6 ms and B's
    10 ms a token."""
    write_fleet(tmp_path)

    def sim(priority: int, output_tokens: int, decode_s: float) -> str:
        return json.dumps({"event": "sim_request", "priority": priority, "prompt_tokens": 100,
                           "output_tokens": output_tokens, "ttft_s": 0.02, "decode_s": decode_s})

    (tmp_path / "3x4-sim-engine-0.log").write_text("\n".join([
        "sim engine h100-llama3-8b at 1.0x", sim(0, 11, 0.3), sim(1, 11, 0.05), sim(1, 1, 0.0),
        sim(2, 101, 1.2), sim(1, 11, 0.08)]) + "\n")
    (tmp_path / "3x4-sim-engine-1.log").write_text("\n".join([
        sim(1, 21, 0.12), sim(2, 51, 0.9), sim(1, 6, 0.05)]) + "\n")
    engine = run(tmp_path)["3x4"]["engine_tpot"]
    assert (engine["A"]["requests"], engine["B"]["requests"]) == (2, 2)
    assert engine["A"]["p50_ms"] == pytest.approx(5.5) and engine["A"]["p99_ms"] == pytest.approx(5.99)
    assert engine["B"]["p99_ms"] == pytest.approx(9.98)
    assert engine["b_over_a_p99"] == pytest.approx(9.98 / 5.99, abs=1e-3)
    done = subprocess.run([str(FLEXSERVE), "bench", "prefill-waits", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert "default TPOT on the engines' own clocks: A p50/p99 5.50/5.99 ms, B 9.00/9.98 ms" in done.stdout


def test_each_default_decode_of_b_is_read_against_the_steps_its_engine_logged(tmp_path: Path) -> None:
    """One engine: flex arrives at 1.0 s and 1.25 s. B's first default
    decodes from 1.2 s to 1.6 s (4 tokens after its first, 100 ms each)
    through the steps starting at 1.2, 1.3, 1.4 and 1.5 s, two of which
    prefill flex (300 and 100 tokens), beside the flex start at 1.25 s; the
    second from 1.8 s to 2.0 s (4 tokens, 50 ms) through two steps, one of
    200 flex tokens, beside none. A's default (before any flex), a one-token
    default and D's request are left out."""
    write_fleet(tmp_path)

    def sim(priority: int, arrival: float, first: float, last: float, output_tokens: int) -> str:
        return json.dumps({"event": "sim_request", "priority": priority, "prompt_tokens": 100,
                           "output_tokens": output_tokens, "ttft_s": round(first - arrival, 6),
                           "decode_s": round(last - first, 6), "arrival_s": arrival,
                           "first_token_s": first, "last_token_s": last})

    def step(start: float, flex_tokens: int) -> str:
        prefill = {"2": flex_tokens} if flex_tokens else {}
        return json.dumps({"event": "sim_step", "start_s": start, "step_s": 0.1,
                           "sequences": {"1": 1, "2": 1}, "prefill_tokens": prefill})

    steps = [step(round(1.1 + 0.1 * i, 6), tokens) for i, tokens in enumerate((0, 0, 300, 0, 100, 0, 0, 0, 200, 0))]
    (tmp_path / "3x4-sim-engine-0.log").write_text("\n".join([
        "sim engine h100-llama3-8b at 1.0x", sim(0, 0.0, 0.1, 0.4, 10), sim(1, 0.5, 0.55, 0.9, 8),
        *steps, sim(2, 1.0, 1.1, 2.2, 50), sim(1, 1.05, 1.2, 1.6, 5), sim(2, 1.25, 1.3, 2.3, 40),
        sim(1, 1.7, 1.8, 2.0, 5), sim(1, 1.7, 1.75, 1.75, 1)]) + "\n")
    decodes = run(tmp_path)["3x4"]["engine_decodes"]
    assert decodes["all"] == {"decodes": 2, "tpot_ms": 75.0, "flex_starts_per_s": 1.25,
                              "steps_with_flex_prefill": 0.5, "flex_prefill_per_token": 75.0}
    assert decodes["slowest_1pct"] == {"decodes": 1, "tpot_ms": 100.0, "flex_starts_per_s": 2.5,
                                       "steps_with_flex_prefill": 0.5, "flex_prefill_per_token": 100.0}
    done = subprocess.run([str(FLEXSERVE), "bench", "prefill-waits", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert ("B's default decodes, the slowest 1 % (1): TPOT 100.00 ms; beside 2.50 flex starts a second; "
            "50.0 % of their steps prefilled flex, 100 flex prompt tokens per output token") in done.stdout


def test_the_command_prints_each_layout_and_writes_its_report(tmp_path: Path) -> None:
    write_fleet(tmp_path)
    out = tmp_path / "waits.json"
    done = subprocess.run([str(FLEXSERVE), "bench", "prefill-waits", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert "3x4: 2 default requests in B; 1 found no prompt pending" in done.stdout
    assert "beside each of 2 decodes, on average: 0.0 other default sequences, 0.9 flex" in done.stdout
    assert json.loads(out.read_text())["layouts"]["3x4"]["another_replica_had_fewer"] == 1


def test_a_directory_without_gateway_logs_is_refused_by_name(tmp_path: Path) -> None:
    done = subprocess.run([str(FLEXSERVE), "bench", "prefill-waits", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "no gateway request logs" in done.stderr and str(tmp_path) in done.stderr
