"""`flexserve plan`: the virtual clock, the sim engine's --stream-interval
and the scheduler's TPOT per token under it, the planner held to measured
`bench tiers` runs (tests/reference), sizing, traces from the ledger, and
the command's report and errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from billing_support import ledger, new_org
from conftest import Gateway, sim_engine, wait_for
from flexserve.cli import main
from flexserve.engines.base import EngineRequest
from flexserve.engines.sim import SimEngine, SimModel
from flexserve.plan import clock
from flexserve.plan.day import Slo, plan_day, size_fleet
from flexserve.plan.simulate import Replica, Window
from flexserve.plan.traffic import from_trace, synthetic
from flexserve.plan.validate import compare
from flexserve.scheduler.policy import SchedulerConfig
from flexserve.scheduler.scheduler import Scheduler, Ticket
from flexserve.tiers import ServiceTier

REFERENCE = Path(__file__).parent / "reference"
MODEL = "llama3-8b-sim-h100"


def test_the_virtual_clock_jumps_to_the_next_timer_and_gives_time_back() -> None:
    real = time.monotonic

    async def sleeper() -> float:
        start = time.monotonic()
        await asyncio.gather(asyncio.sleep(3600), asyncio.sleep(60))
        return time.monotonic() - start

    began = time.perf_counter()
    assert clock.run(sleeper()) == pytest.approx(3600)
    assert time.perf_counter() - began < 60  # an hour passed without waiting for it
    assert time.monotonic is real

    async def forever() -> None:
        await asyncio.Event().wait()

    with pytest.raises(clock.Deadlock):
        clock.run(forever())
    assert time.monotonic is real


async def test_the_sim_engine_tells_its_reader_every_stream_interval_tokens() -> None:
    async def deltas(interval: int) -> list[Any]:
        model = SimModel("h100-llama3-8b", speed=1000.0, stream_interval=interval)
        try:
            request = EngineRequest.chat("r", "m", [{"role": "user", "content": "w w w"}], max_tokens=30,
                                         seed=7)
            return [d async for d in model.generate(request)]
        finally:
            await model.close()

    grouped, single = await deltas(8), await deltas(1)
    counts = [d.usage.completion_tokens for d in grouped if d.usage is not None]
    # The first token at once, then eight at a time, and the end when it comes.
    assert counts == [1, 9, 17, 25, 30]
    assert len(single) == 30
    # The same text either way, only cut differently.
    assert "".join(d.text for d in grouped) == "".join(d.text for d in single)


def test_the_scheduler_learns_tpot_per_token_when_deltas_carry_several() -> None:
    """With vLLM's --stream-interval 8 a delta carries 8 tokens: the replica's
    TPOT calibration must divide by them, or flex admission under a TPOT SLO
    sees default 8× slower than it is and stops."""

    async def run(stream_interval: int) -> float:
        engine = SimEngine("h100-llama3-8b", max_num_seqs=16, stream_interval=stream_interval)
        scheduler = Scheduler.from_engines([engine], SchedulerConfig())
        await scheduler.start()
        [model] = list(scheduler.pools)

        async def one(i: int) -> None:
            ticket = Ticket(request_id=f"d{i}", model=model, tier=ServiceTier.DEFAULT, org_id="o",
                            prompt_tokens=20, cost_tokens=220, stream=True, enqueued_at=time.monotonic())
            request = EngineRequest.chat(f"d{i}", model, [{"role": "user", "content": "w " * 14}],
                                         max_tokens=200)
            async for _ in scheduler.stream(ticket, request):
                pass

        for batch in range(6):
            await asyncio.gather(*(one(batch * 4 + i) for i in range(4)))
        [replica] = scheduler.replicas()
        scale = replica.tpot_scale
        await scheduler.close()
        await engine.close()
        return scale

    every_token, every_eighth = clock.run(run(1)), clock.run(run(8))
    assert 0.5 < every_token < 2.0
    assert every_eighth == pytest.approx(every_token, rel=0.25)


def _bench_b(name: str) -> tuple[dict[str, object], float]:
    report = json.loads((REFERENCE / f"bench-tiers-{name}-b.json").read_text())
    setup, b = report["setup"], report["scenarios"]["B"]
    engine_seconds = b["window_seconds"] * setup["speed"]
    return setup, b["flex_output_tokens"] / engine_seconds


@pytest.mark.parametrize("cost_model", ["flat", "calibrated"])
def test_a_flat_day_at_the_bench_load_harvests_what_bench_tiers_measured(cost_model: str) -> None:
    setup, measured_flex = _bench_b(cost_model)
    window = Window(Replica(setup["profile"], setup["max_num_seqs"], cost_model, None, True), 0.0,
                    duration=60, warmup=10, flex_clients=setup["max_num_seqs"],
                    scheduler=SchedulerConfig(flex_max_wait=1e9))
    day = plan_day(synthetic(setup["default_rate_per_engine_second"], trough=1.0), 1, window, Slo())
    assert len(day.levels) == 1 and all(h.within_slo for h in day.hours)
    planned = day.flex_tokens_per_day / 86400
    assert planned == pytest.approx(measured_flex, rel=0.10)


def test_validate_replays_a_bench_run_within_ten_per_cent() -> None:
    result = compare(REFERENCE / "bench-tiers-flat-b.json")
    figures = result["figures"]
    for name in ("flex_output_tps", "default_output_tps", "default_tpot_p99_ms"):
        assert abs(figures[name]["error"]) < 0.10, (name, figures[name])
    # TTFT's tail is the loosest (the bench's clients and gateway add their own).
    assert abs(figures["default_ttft_p99_ms"]["error"]) < 0.25


def _tiny(window_seconds: float = 8.0) -> Window:
    return Window(Replica("h100-llama3-8b", 16, "calibrated"), 0.0, duration=window_seconds, warmup=2,
                  flex_clients=16, scheduler=SchedulerConfig(flex_max_wait=1e9))


def test_sizing_grows_with_the_target_and_every_fleet_it_names_is_enough() -> None:
    traffic = synthetic(peak=6.0, trough=0.5)
    sizes = []
    for target in (1e7, 1e8, 2e8):
        found, tried = size_fleet(traffic, _tiny(), Slo(), target, levels=2, max_replicas=16)
        assert found is not None, [(p.replicas, p.flex_tokens_per_day) for p in tried]
        assert found.flex_tokens_per_day >= target
        smaller = [p for p in tried if p.replicas < found.replicas]
        assert all(p.flex_tokens_per_day < target or not p.within_slo for p in smaller)
        sizes.append(found.replicas)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]


def test_a_day_missing_its_slo_sells_no_flex_in_those_hours() -> None:
    # A TPOT goal below what one decode step takes: no setting holds it.
    day = plan_day(synthetic(peak=2.0, trough=1.0), 1, _tiny(), Slo(tpot_p99=0.001), levels=1)
    assert not day.within_slo and day.flex_tokens_per_day == 0
    assert day.levels[0].tried > 1  # it raised flex's headroom before giving up


def test_the_plan_command_reads_a_trace_from_the_ledger_and_writes_its_report(
        start_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    gateway = start_gateway(engines=[sim_engine()], engine="sim")
    org = new_org(gateway, "planned")
    for tier in ("default", "default", "default", "flex"):
        org.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=12, service_tier=tier)  # type: ignore[arg-type]
    wait_for(lambda: len(ledger(gateway)) >= 4)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    result = CliRunner().invoke(main, [
        "plan", "--ledger", today, tomorrow, "--db", gateway.db_url, "--max-num-seqs", "16",
        "--window", "5", "--warmup", "1", "--levels", "1", "--price-input", "10", "--price-output", "40",
        "--ttft-p99", "2000", "--out", str(tmp_path / "plan")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "plan" / "plan.json").read_text())
    # Three default requests in the ledger (the flex one is what is planned, not traffic).
    assert report["traffic"].startswith("usage ledger") and "from its 3 requests" in report["traffic"]
    html = (tmp_path / "plan" / "plan.html").read_text()
    assert html.count("<svg") >= 4 and "<title>SLO: 2000.0 ms</title>" in html  # TTFT's goal, drawn
    summary = report["summary"]
    # Revenue is the day's whole tokens at the list price and flex's half price, exactly.
    flex_out = sum(h["output_tokens_per_second"].get("flex", 0) for h in report["hours"])
    assert flex_out > 0 and summary["revenue_per_day_pico"]["flex"] > 0
    assert "within the SLO all day" in result.output


def test_a_trace_file_gives_the_hours_their_rates(tmp_path: Path) -> None:
    day = 1_780_000_000 // 86400 * 86400
    lines = [{"at": day + 9 * 3600 + i, "prompt_tokens": 100, "completion_tokens": 50} for i in range(3600)]
    lines += [{"at": day + 21 * 3600 + 10 * i, "prompt_tokens": 300, "completion_tokens": 20, "tier": "default"}
              for i in range(360)]
    lines += [{"at": day + 22 * 3600, "prompt_tokens": 1, "completion_tokens": 1, "tier": "flex"}]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    traffic = from_trace(path)
    assert traffic.hourly_rate[9] == pytest.approx(1.0) and traffic.hourly_rate[21] == pytest.approx(0.1)
    assert traffic.hourly_rate[22] == 0 and len(traffic.samples) == 3960


@pytest.mark.parametrize(("args", "message"), [
    (["--fleet", "four h100"], "expected 'Nx PROFILE'"),
    (["--fleet", "2x b200-llama3-70b"], "one of: "),
    (["--price-input", "1.00"], "give both --price-input and --price-output"),
    (["--sweep", "headroom=0.2"], "expected tpot_slo=MS"),
])
def test_bad_plan_options_say_what_is_wrong(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["plan", "--home", str(tmp_path), "--window", "2", "--warmup", "0",
                                       "--levels", "1", *args])
    assert result.exit_code != 0 and message in result.output, result.output


def test_validate_refuses_a_file_that_is_not_a_tiers_report(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"benchmark": "something else"}))
    result = CliRunner().invoke(main, ["plan", "--validate", str(path)])
    assert result.exit_code == 1 and "not a `flexserve bench tiers` report" in result.output


def test_a_window_is_replayed_the_same_each_time() -> None:
    window = dataclasses.replace(_tiny(4.0), default_rate=2.0)
    from flexserve.plan.simulate import simulate

    first, second = simulate(window), simulate(window)
    assert first.output_tokens == second.output_tokens and first.default_ttft == second.default_ttft


def test_sizing_for_flex_revenue_answers_a_fleet_that_earns_it(tmp_path: Path) -> None:
    # One replica of 16 sequences sells about $3,200 of flex a day at $10/$40 list prices.
    args = ["plan", "--home", str(tmp_path), "--peak-rps", "6", "--trough", "0.5", "--max-num-seqs", "16",
            "--window", "8", "--warmup", "2", "--levels", "2", "--price-input", "10", "--price-output", "40"]
    result = CliRunner().invoke(main, [*args, "--target-flex-revenue-per-day", "5000"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "plan" / "plan.json").read_text())
    replicas = report["sizing"]["replicas"]
    assert replicas == report["model"]["replicas"] >= 2
    assert report["summary"]["revenue_per_day_pico"]["flex"] >= 5000 * 10**12
    assert f"sizing: {replicas} replica(s) for $5,000.00 of flex a day" in result.output
    both = CliRunner().invoke(main, [*args, "--target-flex-revenue-per-day", "1", "--target-flex-tokens-per-day", "1"])
    assert both.exit_code == 2 and "not both" in both.output


def _measured_steps(path: Path, profile: str = "a100-llama3-8b") -> list[tuple[int, int, float]]:
    """Steps 'measured' on an engine that behaves as ``profile`` says, with ±3 % noise."""
    import random

    from flexserve.engines.sim import PROFILES, step_time

    rng = random.Random(7)
    steps = []
    for tokens in (1, 8, 32, 64, 100, 128, 256, 512, 1024, 2048):
        for kv in (0, 10_000, 50_000, 120_000, 200_000):
            steps.append((tokens, kv, step_time(PROFILES[profile], tokens, kv, "calibrated") * rng.uniform(0.97, 1.03)))
    path.write_text("\n".join(json.dumps({"step_tokens": t, "kv_tokens": k, "seconds": s}) for t, k, s in steps))
    return steps


def test_a_profile_fitted_to_measured_steps_recovers_the_engines_costs(tmp_path: Path) -> None:
    from flexserve.engines.sim import PROFILES
    from flexserve.plan.fit import fitted_profile

    _measured_steps(tmp_path / "steps.jsonl")
    fitted = fitted_profile(tmp_path / "steps.jsonl", "h100-llama3-8b")  # the base gives only its limits
    truth = PROFILES["a100-llama3-8b"]
    for name in ("t1", "t128", "a", "c"):
        assert getattr(fitted.profile, name) == pytest.approx(getattr(truth, name), rel=0.10), name
    assert fitted.profile.kv_tokens == PROFILES["h100-llama3-8b"].kv_tokens
    assert fitted.num_steps == 50 and fitted.rms_seconds < 0.005


def test_the_plan_command_plans_on_a_fitted_profile_and_says_so(tmp_path: Path) -> None:
    _measured_steps(tmp_path / "steps.jsonl")
    result = CliRunner().invoke(main, [
        "plan", "--home", str(tmp_path), "--fit-steps", str(tmp_path / "steps.jsonl"), "--max-num-seqs", "16",
        "--window", "4", "--warmup", "1", "--levels", "1", "--peak-rps", "1", "--trough", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert report["model"]["profile"] == "fitted-steps"
    assert report["model"]["profile_calibration"].startswith("fitted to 50 measured steps (steps.jsonl)")
    (tmp_path / "few.jsonl").write_text('{"step_tokens": 1, "kv_tokens": 0, "seconds": 0.01}\n')
    few = CliRunner().invoke(main, ["plan", "--home", str(tmp_path), "--fit-steps", str(tmp_path / "few.jsonl")])
    assert few.exit_code == 1 and "at least 4 are needed" in few.output
    (tmp_path / "bad.jsonl").write_text('{"tokens": 1}\n')
    bad = CliRunner().invoke(main, ["plan", "--home", str(tmp_path), "--fit-steps", str(tmp_path / "bad.jsonl")])
    assert bad.exit_code == 1 and "bad.jsonl:1: not a step line" in bad.output
