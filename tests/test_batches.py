"""The Batch API end to end: the official SDK against a real gateway in front
of the in-process sim engine, objects checked against OpenAI's schemas, the
ledger read from the SQLite file."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

from billing_support import cli
from flexserve.accounts import Accounts
from flexserve.batches import runner
from flexserve.batches.store import BatchStore
from flexserve.shared.errors import shared_state_unavailable
from flexserve.store.database import Database
from conftest import Gateway, sim_engine, sim_model_id, sql_rows
from openapi import validate

FINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway(engines=[sim_engine(speed=200.0)], engine="sim", batch_window=8)


@pytest.fixture(scope="module")
def model(gateway: Gateway) -> str:
    return sim_model_id(gateway)


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines
    )


def chat_line(custom_id: str, model: str, text: str = "Hello", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}],
                 "max_tokens": 5, **body},
    }


def upload(client: openai.OpenAI, content: bytes) -> str:
    return client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch").id


def wait_final(client: openai.OpenAI, batch_id: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.05)


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(line) for line in client.files.content(file_id).content.splitlines()]


def ledger_rows(gateway: Gateway, prefix: str) -> list[dict[str, Any]]:
    return sql_rows(gateway.db_url, "SELECT * FROM usage_records WHERE request_id LIKE :p", p=prefix + "%")


def test_sdk_workflow_outputs_match_custom_ids_and_bill_once(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    lines = [chat_line(f"task-{i}", model, f"Question {i}") for i in range(20)]
    file_id = upload(client, jsonl(lines))
    raw = client.batches.with_raw_response.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"job": "eval"},
    )
    created = raw.parse()
    validate(raw.http_response.json(), "Batch")
    assert created.status == "validating" and created.metadata == {"job": "eval"}
    batch = wait_final(client, created.id)
    assert batch.status == "completed", batch
    with gateway.http() as http:
        validate(http.get(f"/v1/batches/{batch.id}").json(), "Batch")
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (20, 20, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.error_file_id is None
    output = read_jsonl(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(f"task-{i}" for i in range(20))
    for item in output:
        assert item["id"].startswith("batch_req_") and item["error"] is None
        assert item["response"]["status_code"] == 200
        validate(item["response"]["body"], "CreateChatCompletionResponse")
        assert "service_tier" not in item["response"]["body"]
    # Billed once per line, at the batch tier, from the line's own usage.
    hex_id = batch.id.removeprefix("batch_")
    rows = _wait_rows(gateway, f"req_{hex_id}_", len(output))
    assert len(rows) == len(output)
    assert {row["served_tier"] for row in rows} == {"batch"}
    by_request = {row["request_id"]: row for row in rows}
    for item in output:
        usage = item["response"]["body"]["usage"]
        row = by_request[item["response"]["request_id"]]
        assert row["completion_tokens"] == usage["completion_tokens"]
    assert batch.usage is not None
    assert batch.usage.output_tokens == sum(r["completion_tokens"] for r in rows)
    # The file is downloadable again; the batch appears in the list.
    assert read_jsonl(client, batch.output_file_id) == output
    listed = client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]


def _wait_rows(gateway: Gateway, prefix: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        rows = ledger_rows(gateway, prefix)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_every_bad_line_is_reported_with_its_line(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    lines: list[Any] = [
        chat_line("a", model),                                    # 1 fine
        b"{not json",                                             # 2
        chat_line("a", model),                                    # 3 duplicate of line 1
        {**chat_line("c", model), "url": "/v1/embeddings"},       # 4
        {**chat_line("d", model), "method": "GET"},               # 5
        chat_line("e", "no-such-model"),                          # 6
        chat_line("f", model, stream=True),                       # 7
        chat_line("g", model, max_tokens="many"),                 # 8 the endpoint refuses it
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},  # 9 no custom_id
        chat_line("h\x00", model),                                # 10 PostgreSQL cannot store it
    ]
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    batch = wait_final(client, batch.id)
    assert batch.status == "failed" and batch.failed_at
    with gateway.http() as http:
        validate(http.get(f"/v1/batches/{batch.id}").json(), "Batch")
    assert batch.errors is not None and batch.errors.data is not None
    found = {(e.code, e.line) for e in batch.errors.data}
    for expected in [("invalid_json_line", 2), ("duplicate_custom_id", 3),
                     ("mismatched_url", 4), ("invalid_method", 5), ("model_not_found", 6),
                     ("stream_unsupported", 7), ("missing_custom_id", 9),
                     ("invalid_custom_id", 10)]:
        assert expected in found, (expected, found)
    assert any(line == 8 for _, line in found)
    assert not any(line == 1 for _, line in found)
    # Nothing ran.
    assert ledger_rows(gateway, "req_" + batch.id.removeprefix("batch_")) == []


def test_empty_file_and_wrong_purpose(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    empty = client.batches.create(
        input_file_id=upload(client, b"\n"), endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    failed = wait_final(client, empty.id)
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data is not None
    assert [e.code for e in failed.errors.data] == ["empty_file"]
    other = client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="user_data").id
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=other, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert refused.value.code == "invalid_file_purpose"
    # No file has a NUL in its id; PostgreSQL would not even look one up (a 500 once).
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id=other + "\x00", endpoint="/v1/chat/completions",
                              completion_window="24h")
    for kwargs, param in [
        ({"endpoint": "/v1/moderations"}, "endpoint"),
        ({"completion_window": "1w"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, None),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ]:
        args = {"input_file_id": other, "endpoint": "/v1/chat/completions",
                "completion_window": "24h", **kwargs}
        with pytest.raises(openai.BadRequestError) as bad:
            client.batches.create(**args)  # type: ignore[arg-type]
        if param is not None:
            assert bad.value.param == param


def test_other_organizations_batch_is_404(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, jsonl([chat_line("x", model)])),
        endpoint="/v1/chat/completions", completion_window="24h",
    )
    other = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.new_key("other-org"),
                          max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    assert batch.id not in [b.id for b in other.batches.list().data]
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=batch.input_file_id,
                             endpoint="/v1/chat/completions", completion_window="24h")
    wait_final(client, batch.id)


def test_a_batch_that_cannot_be_taken_in_fails_rather_than_validating_for_ever(
    gateway: Gateway, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that is not an outage that passes would come back each time
    the runner took the batch up again: the batch fails, saying so. (The
    fault is made by hand: every input that caused one is refused by
    validation now, a NUL in a custom_id on PostgreSQL the last.)"""
    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("the file changed under the runner")

    monkeypatch.setattr(runner, "line_rows", unreadable)
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, jsonl([chat_line("x", model)])),
        endpoint="/v1/chat/completions", completion_window="24h",
    )
    failed = wait_final(client, batch.id)
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data is not None
    assert [(e.code, e.message) for e in failed.errors.data] == [
        ("validation_error", "The input file could not be taken in (ValueError).")]
    assert failed.request_counts is not None and failed.request_counts.total == 0


def test_a_batch_whose_take_in_meets_an_outage_is_taken_up_again(
    gateway: Gateway, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared state unreachable once (Redis away, as the budgets report
    it) is an outage that passes: the batch is taken in on the next try."""
    real = runner.line_rows
    outages: list[int] = []

    def once_unreachable(*args: Any, **kwargs: Any) -> Any:
        if not outages:
            outages.append(1)
            raise shared_state_unavailable(ConnectionError("Redis restarting"))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "line_rows", once_unreachable)
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, jsonl([chat_line("x", model), chat_line("y", model)])),
        endpoint="/v1/chat/completions", completion_window="24h",
    )
    final = wait_final(client, batch.id)
    assert outages == [1]
    assert final.status == "completed", final.errors
    assert final.request_counts is not None and final.request_counts.completed == 2


def _slow_batch_underway(
    start_gateway: Callable[..., Gateway], prefix: str
) -> tuple[Gateway, openai.OpenAI, Any]:
    """30 lines on a slow engine, one at a time, once two are done: what a
    cancel or an expiry then cuts short."""
    gateway = start_gateway(engines=[sim_engine(speed=1.0)], engine="sim", batch_window=1)
    model = sim_model_id(gateway)
    client = gateway.client()
    lines = [chat_line(f"{prefix}{i}", model, max_tokens=50) for i in range(30)]
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    _wait_completed(client, batch.id, 2, timeout=20)
    return gateway, client, batch


def _assert_cut_short(gateway: Gateway, client: openai.OpenAI, final: Any, prefix: str,
                      code: str) -> None:
    """Finished lines kept in the output and billed once each; the rest in the
    error file with ``code``, not billed; the counts add up."""
    counts = final.request_counts
    assert counts is not None and counts.total == 30
    output = read_jsonl(client, final.output_file_id)
    errors = read_jsonl(client, final.error_file_id)
    assert counts.completed == len(output) >= 2 and counts.failed == len(errors) > 0
    assert len(output) + len(errors) == 30
    assert sorted(o["custom_id"] for o in output + errors) == sorted(f"{prefix}{i}" for i in range(30))
    assert {e["error"]["code"] for e in errors} == {code}
    _wait_rows(gateway, "req_" + final.id.removeprefix("batch_"), len(output))
    time.sleep(0.2)
    rows = ledger_rows(gateway, "req_" + final.id.removeprefix("batch_"))
    assert sorted(r["request_id"] for r in rows) == sorted(
        o["response"]["request_id"] for o in output
    )


def test_cancel_mid_run_keeps_finished_lines_and_counts_add_up(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway, client, batch = _slow_batch_underway(start_gateway, "t")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    final = wait_final(client, batch.id)
    assert final.status == "cancelled" and final.cancelled_at
    _assert_cut_short(gateway, client, final, "t", "batch_cancelled")


def test_kill_9_mid_batch_resumes_without_doubling(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`flexserve serve` killed mid-batch and started again on the same
    database: the batch completes, no custom_id twice, each line billed once,
    and lines finished before the kill are not run again."""
    import os
    import signal
    from contextlib import ExitStack

    from conftest import _make_org, run_async
    from flexserve.bench.ledger_kill import SIM_PROFILE, start_gateway
    from flexserve.engines.sim import PROFILES

    home = tmp_path / "home"
    home.mkdir()
    _, key = run_async(_make_org(f"sqlite:///{home / 'flexserve.db'}", "kill-org", admin=False))
    model = PROFILES[SIM_PROFILE].model_id
    monkeypatch.setenv("FLEXSERVE_BATCH_WINDOW", "4")
    db_path = home / "flexserve.db"
    lines = [chat_line(f"k{i}", model, max_tokens=8) for i in range(40)]
    with ExitStack() as stack:
        server = start_gateway(stack, home, "batch-killed", speed=5.0)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        batch = client.batches.create(
            input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        _wait_completed(client, batch.id, 6, timeout=30)
        os.killpg(server.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
    with sqlite3.connect(db_path) as conn:
        done_before = {
            line for (line,) in conn.execute(
                "SELECT line FROM batch_lines WHERE batch_id = ? AND state = 'done'", (batch.id,)
            )
        }
    assert 6 <= len(done_before) < 40
    with ExitStack() as stack:
        server = start_gateway(stack, home, "batch-restarted", speed=50.0)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        final = wait_final(client, batch.id, timeout=60)
        assert final.status == "completed", final
        output = read_jsonl(client, final.output_file_id)
    custom_ids = [o["custom_id"] for o in output]
    assert sorted(custom_ids) == sorted(f"k{i}" for i in range(40))  # none twice, none lost
    with sqlite3.connect(db_path) as conn:
        attempts = dict(conn.execute(
            "SELECT line, attempts FROM batch_lines WHERE batch_id = ?", (batch.id,)
        ).fetchall())
        billed = [r for (r,) in conn.execute(
            "SELECT request_id FROM usage_records WHERE request_id LIKE ?",
            ("req_" + batch.id.removeprefix("batch_") + "_%",),
        )]
    assert all(attempts[line] == 1 for line in done_before)  # not run again
    assert sorted(billed) == sorted(o["response"]["request_id"] for o in output)


def test_cli_lists_shows_and_cancels_across_organizations(
    start_gateway: Callable[..., Gateway],
) -> None:
    from click.testing import CliRunner

    from flexserve.cli import main

    gateway = start_gateway(engines=[sim_engine(speed=1.0)], engine="sim", batch_window=1)
    model = sim_model_id(gateway)
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, jsonl([chat_line(f"c{i}", model, max_tokens=50)
                                            for i in range(20)])),
        endpoint="/v1/chat/completions", completion_window="24h",
    )
    runner = CliRunner()
    db = ["--db", gateway.db_url]
    listed = runner.invoke(main, ["batches", "list", *db])
    assert listed.exit_code == 0, listed.output
    assert batch.id in listed.output
    shown = runner.invoke(main, ["batches", "show", batch.id, *db])
    assert shown.exit_code == 0, shown.output
    document = orjson.loads(shown.output)
    assert document["id"] == batch.id and document["org_id"].startswith("org")
    cancelled = runner.invoke(main, ["batches", "cancel", batch.id, *db])
    assert cancelled.exit_code == 0, cancelled.output
    # The running gateway notices and ends it.
    final = wait_final(client, batch.id)
    assert final.status == "cancelled"
    counts = final.request_counts
    assert counts is not None and counts.completed + counts.failed == 20
    missing = runner.invoke(main, ["batches", "show", "batch_nope", *db])
    assert missing.exit_code != 0


def _wait_completed(client: openai.OpenAI, batch_id: str, num_lines: int, timeout: float) -> None:
    """Until at least ``num_lines`` of the batch are completed."""
    deadline = time.monotonic() + timeout
    while _counts(client, batch_id).completed < num_lines:
        assert time.monotonic() < deadline, f"fewer than {num_lines} lines completed"
        time.sleep(0.05)


def _counts(client: openai.OpenAI, batch_id: str) -> Any:
    counts = client.batches.retrieve(batch_id).request_counts
    assert counts is not None
    return counts


def test_progress_and_output_so_far_while_in_progress(
    start_gateway: Callable[..., Gateway], tmp_path: Any,
) -> None:
    """The batch object shows lines in flight, cost so far and an estimated
    end while it runs; `/output` serves the finished lines, each whole."""
    db_url = f"sqlite:///{tmp_path / 'flexserve.db'}"
    model = sim_engine().models()[0].id
    cli(db_url, "prices", "set", model, "--input", "1", "--output", "4")
    gateway = start_gateway(engines=[sim_engine(speed=4.0)], engine="sim", batch_window=2,
                            db=db_url)
    client = gateway.client()
    lines = [chat_line(f"p{i}", model, max_tokens=12) for i in range(80)]
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    deadline = time.monotonic() + 30
    _wait_completed(client, batch.id, 4, timeout=30)
    with gateway.http() as http:
        # Lines finish and the next are claimed: now and then none is running.
        while True:
            document = http.get(f"/v1/batches/{batch.id}").json()
            if document["flexserve"]["lines_in_flight"] > 0:
                break
            assert time.monotonic() < deadline
        validate(document, "Batch")
        completed = document["request_counts"]["completed"]
        so_far = http.get(f"/v1/batches/{batch.id}/output")
        assert so_far.status_code == 200
        partial = [orjson.loads(line) for line in so_far.content.splitlines()]
    assert document["status"] == "in_progress"
    extra = document["flexserve"]
    assert extra["lines_in_flight"] <= 2
    assert extra["estimated_completion_at"] >= document["created_at"]
    assert len(partial) >= completed >= 4
    assert all(item["response"]["status_code"] == 200 for item in partial)
    final = wait_final(client, batch.id, timeout=60)
    with gateway.http() as http:
        done = http.get(f"/v1/batches/{final.id}").json()
        whole = http.get(f"/v1/batches/{final.id}/output").content
        assert http.get(f"/v1/batches/{final.id}/errors").content == b""
    # The output so far was the start of the output file, in input order.
    output = client.files.content(final.output_file_id).content  # type: ignore[arg-type]
    assert whole == output
    assert [o["custom_id"] for o in partial] == [
        orjson.loads(line)["custom_id"] for line in output.splitlines()[: len(partial)]
    ]
    # What it cost is what its ledger rows cost.
    rows = _wait_rows(gateway, "req_" + final.id.removeprefix("batch_"), 80)
    pico = sum(r["input_cost_pico"] + r["cached_input_cost_pico"] + r["output_cost_pico"]
               for r in rows)
    assert pico > 0
    assert done["flexserve"]["cost"] == {"value": pico / 1e12, "currency": "usd"}
    assert done["flexserve"]["lines_in_flight"] == 0


def test_expiry_mid_run_keeps_finished_lines_and_fails_the_rest(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway, client, batch = _slow_batch_underway(start_gateway, "x")
    # The window closes now (as a day passing would).
    sql_rows(gateway.db_url, "UPDATE batches SET expires_at = :t WHERE id = :b RETURNING id",
             t=int(time.time()), b=batch.id)
    final = wait_final(client, batch.id)
    assert final.status == "expired" and final.expired_at
    _assert_cut_short(gateway, client, final, "x", "batch_expired")


def test_a_batch_holds_its_expected_cost_and_gives_back_what_it_did_not_use(
    start_gateway: Callable[..., Gateway], tmp_path: Any,
) -> None:
    """A batch's expected cost is held against its organization's budget at
    create: a second batch that would not fit beside it fails with
    `insufficient_quota` before anything runs; once the first is cancelled,
    what it did not use is free again."""
    db_url = f"sqlite:///{tmp_path / 'flexserve.db'}"
    model = sim_engine().models()[0].id
    cli(db_url, "prices", "set", model, "--input", "1", "--output", "4")
    gateway = start_gateway(engines=[sim_engine(speed=1.0)], engine="sim", batch_window=1,
                            db=db_url, policy_refresh_interval=0.1)
    client = gateway.client()
    content = jsonl([chat_line(f"b{i}", model, max_tokens=50) for i in range(20)])

    def create() -> Any:
        return client.batches.create(input_file_id=upload(client, content),
                                     endpoint="/v1/chat/completions", completion_window="24h")

    first = create()
    deadline = time.monotonic() + 20
    while client.batches.retrieve(first.id).status == "validating":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ((expected,),) = [tuple(r.values()) for r in sql_rows(
        db_url, "SELECT SUM(expected_cost_pico) FROM batch_lines WHERE batch_id = :b", b=first.id)]
    ((org_name,),) = [tuple(r.values()) for r in sql_rows(
        db_url, "SELECT o.name FROM organizations o JOIN batches b ON b.org_id = o.id WHERE b.id = :b",
        b=first.id)]
    assert expected > 0
    # Room for one and a half such batches.
    cli(db_url, "orgs", "set-budget", org_name, "--monthly-usd", str(expected * 1.5 / 1e12))
    time.sleep(0.5)  # the gateway reloads budgets every 0.1 s
    refused = wait_final(client, create().id)
    assert refused.status == "failed"
    assert refused.errors is not None and refused.errors.data is not None
    assert [e.code for e in refused.errors.data] == ["insufficient_quota"]
    client.batches.cancel(first.id)
    cancelled = wait_final(client, first.id)
    assert cancelled.status == "cancelled"
    assert cancelled.request_counts is not None
    assert cancelled.request_counts.completed < 10
    # The cancelled batch spent a few lines; the rest of its hold is free.
    again = create()
    deadline = time.monotonic() + 20
    while (status := client.batches.retrieve(again.id).status) == "validating":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status == "in_progress"
    client.batches.cancel(again.id)
    wait_final(client, again.id)


def test_lines_sharing_a_prompt_prefix_run_together(start_gateway: Callable[..., Gateway]) -> None:
    """Lines alternate between two long system prompts: they run grouped by
    prompt (each group in file order), and the output stays in file order."""
    # Two lines at a time: the first four to finish are of the first group.
    gateway = start_gateway(engines=[sim_engine(speed=200.0)], engine="sim", batch_window=2)
    model = sim_model_id(gateway)
    client = gateway.client()
    systems = ["You label support tickets. " * 30, "You translate product names. " * 30]
    lines = [
        {**chat_line(f"g{i}", model, f"Item {i}"),
         "body": {"model": model, "max_tokens": 3, "messages": [
             {"role": "system", "content": systems[i % 2]},
             {"role": "user", "content": f"Item {i}"}]}}
        for i in range(12)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    final = wait_final(client, batch.id)
    assert final.status == "completed"
    run_order = [r["line"] for r in sql_rows(
        gateway.db_url, "SELECT line FROM batch_lines WHERE batch_id = :b ORDER BY run_order", b=batch.id)]
    assert run_order == [1, 3, 5, 7, 9, 11, 2, 4, 6, 8, 10, 12]
    # Run in that order.
    hex_id = batch.id.removeprefix("batch_")
    rows = _wait_rows(gateway, f"req_{hex_id}_", 12)
    ran = [int(r["request_id"].rsplit("_", 1)[1]) for r in sorted(rows, key=lambda r: r["id"])]
    assert set(ran[:4]) <= {1, 3, 5, 7, 9, 11} and set(ran[-4:]) <= {2, 4, 6, 8, 10, 12}
    output = read_jsonl(client, final.output_file_id)
    assert [o["custom_id"] for o in output] == [f"g{i}" for i in range(12)]


def test_a_shorter_window_is_billed_at_its_own_price(
    start_gateway: Callable[..., Gateway], tmp_path: Any,
) -> None:
    db_url = f"sqlite:///{tmp_path / 'flexserve.db'}"
    model = sim_engine().models()[0].id
    cli(db_url, "prices", "set", model, "--input", "1", "--output", "4")
    gateway = start_gateway(engines=[sim_engine(speed=200.0)], engine="sim", db=db_url)
    client = gateway.client()
    ids = {}
    for window in ("1h", "24h"):
        batch = client.batches.create(
            input_file_id=upload(client, jsonl([chat_line(f"{window}-{i}", model)
                                                for i in range(3)])),
            endpoint="/v1/chat/completions", completion_window=window,  # type: ignore[arg-type]
        )
        final = wait_final(client, batch.id)
        assert final.status == "completed" and final.completion_window == window
        assert final.expires_at == final.created_at + {"1h": 3600, "24h": 86400}[window]
        ids[window] = final.id
    # Batch is half the list price; 1h costs 1.5 times that: $0.75 and $3 per 1M tokens.
    for window, (input_micro, output_micro) in {"1h": (750_000, 3_000_000),
                                                "24h": (500_000, 2_000_000)}.items():
        rows = _wait_rows(gateway, "req_" + ids[window].removeprefix("batch_"), 3)
        assert len(rows) == 3
        for row in rows:
            assert row["served_tier"] == "batch"
            assert (row["input_price_micro"], row["output_price_micro"]) == (input_micro,
                                                                            output_micro)
            assert row["output_cost_pico"] == row["completion_tokens"] * output_micro


def test_output_expires_after_sets_the_output_files_expiry(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    file_id = upload(client, jsonl([chat_line("ok", model), chat_line("bad", model, n="two")]))
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    final = wait_final(client, batch.id)
    assert final.status == "failed"  # line 2 does not validate: no output file at all
    lines = [chat_line(f"e{i}", model) for i in range(3)]
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
        completion_window="24h", output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    final = wait_final(client, batch.id)
    assert final.status == "completed" and final.output_file_id
    output = client.files.retrieve(final.output_file_id)
    assert output.expires_at is not None
    assert output.expires_at - output.created_at == 7200  # anchored at the file's own creation
    # Without it, output files are kept until deleted.
    plain = wait_final(client, client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
        completion_window="24h").id)
    assert client.files.retrieve(plain.output_file_id).expires_at is None  # type: ignore[arg-type]
    for bad, param in [({"anchor": "last_active_at", "seconds": 7200}, "output_expires_after.anchor"),
                       ({"anchor": "created_at", "seconds": 60}, "output_expires_after.seconds"),
                       ("soon", "output_expires_after")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                output_expires_after=bad,  # type: ignore[arg-type]
            )
        assert refused.value.param == param


def test_every_line_of_a_batch_many_windows_long_is_recorded(gateway: Gateway, model: str) -> None:
    """200 lines, 8 in flight at a time, finishing in any order: each result
    is recorded, whichever flush it falls in."""
    client = gateway.client()
    lines = [chat_line(f"w{i}", model, f"Question {i}", max_tokens=1 + i % 7) for i in range(200)]
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    final = wait_final(client, batch.id, timeout=60)
    assert final.status == "completed"
    assert final.request_counts is not None
    assert (final.request_counts.completed, final.request_counts.failed) == (200, 0)
    output = read_jsonl(client, final.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(f"w{i}" for i in range(200))
    states = {r["state"]: r["n"] for r in sql_rows(
        gateway.db_url, "SELECT state, COUNT(*) AS n FROM batch_lines WHERE batch_id = :b GROUP BY state",
        b=final.id)}
    assert states == {"done": 200}


async def _batch_in_progress(db: Database, batch_id: str, num_lines: int) -> BatchStore:
    """A migrated database holding a batch in progress of ``num_lines`` lines."""
    await db.migrate()
    org = await Accounts(db).create_org("acme")
    store = BatchStore(db)
    await store.insert({
        "id": batch_id, "org_id": org.id, "project_id": "p", "api_key_id": "k",
        "endpoint": "/v1/chat/completions", "input_file_id": "file_x", "completion_window": "24h",
        "status": "in_progress", "created_at": 0, "expires_at": 86_400,
    })
    await store.add_lines([
        {"batch_id": batch_id, "line": i, "custom_id": f"c{i}", "body": "{}",
         "request_id": f"req_{batch_id}_{i}", "run_order": i}
        for i in range(1, num_lines + 1)
    ])
    return store


async def test_workers_claiming_one_batch_at_once_never_claim_a_line_twice(tmp_db_url: str) -> None:
    """Eight claimers drain a batch of 400 lines five at a time, concurrently
    (as the workers of several gateways on one PostgreSQL database would):
    every line is claimed exactly once, on its first attempt, no more than
    five to a claim."""
    db = Database.from_url(tmp_db_url)
    try:
        store = await _batch_in_progress(db, "batch_race", 400)

        async def claimer() -> list[int]:
            mine: list[int] = []
            while claimed := await store.claim("batch_race", 5, runner="r", lease_until=2**40):
                mine.extend(line.line for line in claimed)
                assert len(claimed) <= 5 and all(line.attempts == 1 for line in claimed)
            return mine

        claims = await asyncio.gather(*(claimer() for _ in range(8)))
        every = sorted(line for mine in claims for line in mine)
        assert every == list(range(1, 401))
        assert await store.num_running("batch_race") == 400
    finally:
        await db.close()


async def test_a_dead_runners_lines_are_taken_back_and_a_live_ones_are_not(tmp_db_url: str) -> None:
    """Lines claimed by a runner that stopped renewing (past their lease) go
    back to pending for any runner; those of a runner that renews stay its
    own; a runner restarted takes its own back at once."""
    db = Database.from_url(tmp_db_url)
    try:
        store = await _batch_in_progress(db, "batch_lease", 9)
        now = 1_000
        dead = await store.claim("batch_lease", 3, runner="dead", lease_until=now + 60)
        live = await store.claim("batch_lease", 3, runner="live", lease_until=now + 60)
        restarted = await store.claim("batch_lease", 3, runner="me", lease_until=now + 60)
        assert [len(dead), len(live), len(restarted)] == [3, 3, 3]
        for runner in ("live", "me"):  # live runners renew; the dead one cannot
            await store.renew("batch_lease", runner, now + 120)
        assert await store.reclaim("batch_lease", "me", now + 61, own=False) == 3
        back = await store.claim("batch_lease", 9, runner="me", lease_until=now + 200)
        assert sorted(line.line for line in back) == sorted(line.line for line in dead)
        assert all(line.attempts == 2 for line in back)
        assert await store.reclaim("batch_lease", "me", now + 61, own=True) == 6  # its own, restarted
        assert await store.num_running("batch_lease") == 3  # the live runner's
    finally:
        await db.close()
