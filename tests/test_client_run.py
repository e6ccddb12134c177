"""The flex client (``flexserve run``, ``flexserve.client``) against real
servers on loopback: FlexServe on the sim engine, and the bare sim engine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import Gateway, ServerThread, sim_engine, sim_model_id, sql_rows, wait_for
from flexserve.client import flex_call, map_requests_sync
from flexserve.client.calls import CallPolicy, Outcome
from flexserve.client.costs import Prices
from flexserve.client.jobs import JobError, Line, PromptFormat, read_lines
from flexserve.client.results import errors_path_for
from flexserve.client.runner import RunOptions, run_job
from flexserve.engines.sim import SimModel
from flexserve.engines.sim.server import create_sim_app

FLEXSERVE = [sys.executable, "-m", "flexserve.cli"]


def batch_input(path: Path, model: str, num_lines: int, max_tokens: int = 8) -> Path:
    with open(path, "w") as file:
        for i in range(num_lines):
            file.write(json.dumps({
                "custom_id": f"job-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "max_tokens": max_tokens,
                         "messages": [{"role": "user", "content": f"Item {i}."}]},
            }) + "\n")
    return path


def output_ids(path: Path) -> list[str]:
    return [json.loads(raw)["custom_id"] for raw in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def refusing_gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    """A small engine and flex waits of at most a tenth of a second: a bulk
    flex job saturates it and is refused (429 with Retry-After) whenever the
    queue would make it wait longer."""
    return start_gateway(engines=[sim_engine(speed=10, max_num_seqs=8)], engine="sim",
                         flex_max_wait=0.1)


def test_a_2000_line_flex_job_on_a_saturated_engine_answers_every_line_once(
    refusing_gateway: Gateway, tmp_path: Path,
) -> None:
    """64 in flight on an engine that runs 8: the gateway refuses with 429s,
    and every retry waits what Retry-After said."""
    model = sim_model_id(refusing_gateway)
    lines = read_lines(batch_input(tmp_path / "in.jsonl", model, 2000, max_tokens=32),
                       PromptFormat())
    outcomes: list[Outcome] = []

    async def go() -> Any:
        async with refusing_gateway.async_client() as client:
            return await run_job(client, lines, tmp_path / "out.jsonl",
                                 RunOptions(concurrency=64),
                                 on_outcome=lambda line, outcome: outcomes.append(outcome))

    progress = asyncio.run(go())
    ids = output_ids(tmp_path / "out.jsonl")
    assert sorted(ids) == sorted(line.custom_id for line in lines)  # each once
    assert progress.done == 2000 and progress.failed == 0
    assert progress.refusals > 0, "the job never pushed the gateway to refuse"
    waits = [wait for outcome in outcomes for wait in outcome.waits]
    assert len(waits) == sum(o.refusals for o in outcomes) == progress.refusals
    assert all(asked is not None and slept == asked for asked, slept in waits), waits[:10]
    served = {json.loads(raw)["response"]["body"]["service_tier"]
              for raw in (tmp_path / "out.jsonl").read_text().splitlines()}
    assert served == {"flex"}


def test_a_flex_request_falls_back_to_default_after_the_stated_time_and_is_billed_so(
    start_gateway: Callable[..., Gateway],
) -> None:
    """One long default run holds one of two slots, the other is default's
    headroom: flex is refused until the fallback, then runs as default."""
    gateway = start_gateway(engines=[sim_engine(speed=1, max_num_seqs=2)], engine="sim",
                            flex_max_wait=0.0)
    model = sim_model_id(gateway)
    holder = threading.Thread(target=lambda: gateway.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hold."}], max_tokens=800))
    holder.start()
    try:
        with gateway.http() as http:
            wait_for(lambda: 'tier="default"} 1.0' in http.get("/metrics").text)

        async def go() -> Outcome:
            async with gateway.async_client() as client:
                return await flex_call(client, {"model": model, "max_tokens": 4, "messages": [
                    {"role": "user", "content": "Fall back."}]},
                    fallback_tier="default", fallback_after=1.0)

        outcome = asyncio.run(go())
    finally:
        holder.join(timeout=60)
    assert outcome.ok and outcome.fell_back
    assert outcome.refusals >= 1 and outcome.seconds >= 1.0
    assert outcome.served_tier == "default"
    request_id = outcome.body["id"]
    rows = sql_rows(gateway.db_url, "SELECT requested_tier, served_tier FROM usage_records "
                    "WHERE served_tier = 'default' AND requested_tier = 'default' "
                    "AND completion_tokens = 4")
    assert len(rows) == 1, (request_id, rows)


def test_the_runner_killed_mid_job_and_run_again_writes_each_line_once(
    start_gateway: Callable[..., Gateway], tmp_path: Path,
) -> None:
    gateway = start_gateway(engines=[sim_engine(speed=10, max_num_seqs=8)], engine="sim",
                            org="client-kill")
    model = sim_model_id(gateway)
    source = batch_input(tmp_path / "in.jsonl", model, 300, max_tokens=16)
    out = tmp_path / "out.jsonl"
    command = [*FLEXSERVE, "run", str(source), "-o", str(out), "--base-url", gateway.url + "/v1",
               "--api-key", gateway.api_key, "--concurrency", "16", "--quiet"]
    runner = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(lambda: out.exists() and len(out.read_bytes().splitlines()) >= 60, timeout=60)
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=10)
    written_before = len(output_ids(out))
    assert written_before < 300
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    ids = output_ids(out)
    assert len(ids) == len(set(ids)) == 300
    assert f"({written_before} done before)" in again.stderr.replace(",", "")
    rows = sql_rows(gateway.db_url, "SELECT request_id FROM usage_records WHERE "
                    "completion_tokens = 16")
    # Engine calls: every line once, and at most what was in flight at the kill again.
    assert 300 <= len(rows) <= 300 + 16


def test_a_bare_engine_without_flexserve_runs_the_job_on_aimd_alone(tmp_path: Path) -> None:
    with ServerThread(create_sim_app(SimModel("h100-llama3-8b", speed=50.0,
                                              max_num_seqs=8))) as engine:
        model = openai.OpenAI(base_url=engine.url + "/v1", api_key="none").models.list().data[0].id
        source = batch_input(tmp_path / "in.jsonl", model, 200)
        done = subprocess.run([*FLEXSERVE, "run", str(source), "-o", str(tmp_path / "out.jsonl"),
                               "--base-url", engine.url + "/v1", "--quiet"],
                              capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(output_ids(tmp_path / "out.jsonl")) == sorted(f"job-{i}" for i in range(200))
    assert "200 of 200 lines answered" in done.stderr


def test_max_cost_stops_before_the_cost_passes_it(sim_gateway: Gateway, tmp_path: Path) -> None:
    model = sim_model_id(sim_gateway)
    lines = read_lines(batch_input(tmp_path / "in.jsonl", model, 100, max_tokens=10),
                       PromptFormat())
    # $40/1M output at default, flex half: at most ~$0.0006 a line; $0.01 pays for some.
    limit = Decimal("0.01")
    options = RunOptions(prices=Prices.parse("10/40"), max_cost=limit, concurrency=4)

    async def go() -> Any:
        async with sim_gateway.async_client() as client:
            return await run_job(client, lines, tmp_path / "out.jsonl", options)

    progress = asyncio.run(go())
    assert progress.stopped == "max_cost"
    assert 0 < progress.done < 100
    assert 0 < progress.spent <= limit
    assert progress.spent == progress.done * Prices.parse("10/40").flex.cost(  # type: ignore[union-attr]
        progress.input_tokens // progress.done, 10)


def test_via_batch_gives_the_same_output_as_direct(sim_gateway: Gateway, tmp_path: Path) -> None:
    model = sim_model_id(sim_gateway)
    source = batch_input(tmp_path / "in.jsonl", model, 40)
    common = ["--base-url", sim_gateway.url + "/v1", "--api-key", sim_gateway.api_key, "--quiet"]
    results = {}
    for via in ("direct", "batch"):
        out = tmp_path / f"{via}.jsonl"
        done = subprocess.run([*FLEXSERVE, "run", str(source), "-o", str(out), "--via", via,
                               *common], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        results[via] = {
            record["custom_id"]: (record["response"]["status_code"],
                                  record["response"]["body"]["usage"]["prompt_tokens"],
                                  record["response"]["body"]["usage"]["completion_tokens"])
            for record in map(json.loads, out.read_text().splitlines())}
    assert len(results["direct"]) == 40
    assert results["batch"] == results["direct"]


def test_a_bad_request_is_final_and_goes_to_the_error_file_with_its_reason(
    sim_gateway: Gateway, tmp_path: Path,
) -> None:
    model = sim_model_id(sim_gateway)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in (
        {"custom_id": "good", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "max_tokens": -5, "messages": [{"role": "user", "content": "Hi"}]}},
    )))
    out = tmp_path / "out.jsonl"
    done = subprocess.run([*FLEXSERVE, "run", str(source), "-o", str(out), "--base-url",
                           sim_gateway.url + "/v1", "--api-key", sim_gateway.api_key, "--quiet"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert output_ids(out) == ["good"]
    [error] = [json.loads(raw) for raw in errors_path_for(out).read_text().splitlines()]
    assert error["custom_id"] == "bad"
    assert error["response"]["status_code"] == 400
    assert "max_tokens" in error["error"]["message"]
    # Run again: nothing is sent twice (the bad line stays failed unless --retry-errors).
    again = subprocess.run([*FLEXSERVE, "run", str(source), "-o", str(out), "--base-url",
                            sim_gateway.url + "/v1", "--api-key", sim_gateway.api_key, "--quiet"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert "(2 done before)" in again.stderr
    assert output_ids(out) == ["good"]


def test_a_torn_last_line_is_dropped_and_its_request_sent_again(
    sim_gateway: Gateway, tmp_path: Path,
) -> None:
    model = sim_model_id(sim_gateway)
    lines = [Line(f"t-{i}", "/v1/chat/completions", {"model": model, "max_tokens": 2, "messages": [
        {"role": "user", "content": "x"}]}) for i in range(3)]
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"custom_id": "t-0", "response": {"status_code": 200}}) + "\n"
                   + '{"custom_id": "t-1", "respo')  # a write cut short by kill -9

    async def go() -> Any:
        async with sim_gateway.async_client() as client:
            return await run_job(client, lines, out, RunOptions(concurrency=2))

    progress = asyncio.run(go())
    assert (progress.skipped, progress.done) == (1, 2)
    assert sorted(output_ids(out)) == ["t-0", "t-1", "t-2"]


def test_prompts_from_text_and_csv_become_chat_requests(tmp_path: Path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("first\n\nsecond\n")
    lines = read_lines(text, PromptFormat(model="m", template="Q: {prompt}", max_tokens=5))
    assert [(line.custom_id, line.body["messages"][-1]["content"]) for line in lines] == [
        ("line-1", "Q: first"), ("line-2", "Q: second")]
    assert lines[0].body["max_tokens"] == 5 and lines[0].path == "/chat/completions"
    table = tmp_path / "rows.csv"
    table.write_text("name,question\nAda,Why?\nBob,How?\n")
    lines = read_lines(table, PromptFormat(model="m", column="question",
                                           template="{name} asks: {prompt}", system="Be brief."))
    assert [line.body["messages"] for line in lines][1] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bob asks: How?"}]
    with pytest.raises(JobError, match="need --model"):
        read_lines(text, PromptFormat())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a", "url": "/v1/chat/completions", "body": {"model": "m"}}\n'
                   '{"custom_id": "a", "url": "/v1/chat/completions", "body": {"model": "m"}}\n')
    with pytest.raises(JobError, match="'a' appears twice"):
        read_lines(bad, PromptFormat())
    bad.write_text('{"custom_id": "a", "url": "/v1/images", "body": {"model": "m"}}\n')
    with pytest.raises(JobError, match=r"bad.jsonl:1: 'url' must be one of"):
        read_lines(bad, PromptFormat())


def test_map_requests_sync_answers_in_order(sim_gateway: Gateway) -> None:
    model = sim_model_id(sim_gateway)
    seen: list[int] = []
    outcomes = map_requests_sync(
        sim_gateway.client(),
        [{"model": model, "max_tokens": n, "messages": [{"role": "user", "content": "x"}]}
         for n in (1, 2, 3, 4)],
        policy=CallPolicy(tier="flex"), on_progress=lambda done, total: seen.append(done))
    assert [o.body["usage"]["completion_tokens"] for o in outcomes] == [1, 2, 3, 4]
    assert seen == [1, 2, 3, 4]


def test_the_example_runs_against_a_gateway(sim_gateway: Gateway) -> None:
    example = Path(__file__).parent.parent / "examples" / "flex_client.py"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                          timeout=60, check=False,
                          env={**os.environ, "OPENAI_BASE_URL": sim_gateway.url + "/v1",
                               "OPENAI_API_KEY": sim_gateway.api_key})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "served at flex" in done.stdout
    assert "10 of 10 answered, 80 tokens" in done.stdout


def test_the_pacer_halves_once_per_burst_of_refusals_and_grows_on_answers() -> None:
    from flexserve.client.pacing import Pacer

    async def go() -> None:
        pacer = Pacer(start=8, cooldown=60.0)
        for _ in range(4):
            pacer.answered(0.1)  # slow start: one more per answer
        assert pacer.allowed == 12
        pacer.refused(429, 1.0)
        pacer.refused(429, 1.0)  # the same burst: one cut
        assert pacer.allowed == 6
        for _ in range(6):
            pacer.answered(0.1)  # after a refusal: about one more per round of answers
        assert pacer.allowed == 6 and 6.9 < pacer.limit < 7
        pacer.answered(5.0)  # far slower than the fastest: no growth
        assert pacer.limit < 8
        fixed = Pacer(fixed=4)
        fixed.refused(429, None)
        fixed.answered(0.01)
        assert fixed.allowed == 4

    asyncio.run(go())
