"""Structured logs: the request log a real `flexserve serve` writes (JSON by
default, text when asked, off when asked), checked against the ledger; and
the formatters' lines. The scheduler's decision lines (preempted, downgraded,
flex refused) are checked where those decisions are tested: test_scheduler.py."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import serve_process
from flexserve.observability.logs import (
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    configure,
    request_id_var,
)

MESSAGES = [{"role": "user", "content": "Label this record."}]


def json_lines(log: Path) -> list[dict[str, Any]]:
    """The log's JSON lines (the welcome `serve` prints first is plain text)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def ledger(home: Path, request_id: str) -> dict[str, Any]:
    with sqlite3.connect(home / "flexserve.db") as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM usage_records WHERE request_id = ?", (request_id,)).fetchone()
    assert row is not None, f"no usage row for {request_id}"
    return dict(row)


def serve_sim(home: Path, **env: str) -> Any:
    return serve_process(home, "--engine", "sim", "--sim-speed", "50", env=env)


def one_request(home: Path, **env: str) -> tuple[str, list[str]]:
    """A `serve` with ``env`` answers one chat request of 4 tokens: its
    request id, and the lines the server wrote."""
    with serve_sim(home, **env) as (_, url, log):
        key = (home / "demo_key").read_text().strip()
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=4)
    return raw.headers["x-request-id"], log.read_text().splitlines()


def test_serve_writes_a_json_line_per_request_as_the_ledger_has_it(tmp_path: Path) -> None:
    model = "llama3-8b-sim-h100"  # `serve --engine sim`'s, priced at o3's list price
    config = tmp_path / "flexserve.toml"
    config.write_text(f'[prices."{model}"]\ninput = "10.00"\noutput = "40.00"\n')
    with serve_process(tmp_path, "--engine", "sim", "--sim-speed", "50", "--config", str(config)) \
            as (_, url, log):
        key = (tmp_path / "demo_key").read_text().strip()
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert client.models.list().data[0].id == model
        served: dict[str, Any] = {}
        for tier in ("default", "flex"):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=MESSAGES, max_tokens=8, service_tier=tier)  # type: ignore[arg-type]
            served[tier] = (raw.headers["x-request-id"], raw.parse())
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=-1)
        stranger = openai.OpenAI(base_url=url + "/v1", api_key="sk-fs-not-a-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as unknown:
            stranger.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    lines = json_lines(log)
    by_id = {line["request_id"]: line for line in lines if line.get("event") in ("request", "refused")}
    for tier, (request_id, completion) in served.items():
        line, row = by_id[request_id], ledger(tmp_path, request_id)
        assert (line["event"], line["requested_tier"], line["served_tier"], line["status"]) \
            == ("request", tier, tier, "completed")
        assert line["replica"] == "sim"  # the replica that served it (`serve --engine sim`'s one)
        assert (line["prompt_tokens"], line["completion_tokens"]) \
            == (completion.usage.prompt_tokens, completion.usage.completion_tokens)
        # Who and what it cost, as the ledger holds them (never the key).
        assert (line["org_id"], line["project_id"], line["model"]) == (row["org_id"], row["project_id"], model)
        assert line["cost_pico"] == row["input_cost_pico"] + row["cached_input_cost_pico"] + row["output_cost_pico"]
        assert (line["queue_time_ms"], line["ttft_ms"], line["total_time_ms"]) \
            == (row["queue_time_ms"], row["ttft_ms"], row["total_time_ms"])
    # The same tokens at half the price on flex.
    assert by_id[served["flex"][0]]["cost_pico"] * 2 == by_id[served["default"][0]]["cost_pico"] > 0
    refused = by_id[bad.value.response.headers["x-request-id"]]
    assert (refused["event"], refused["http_status"]) == ("refused", 400)
    assert "max_tokens" in refused["reason"] and refused["org_id"] == by_id[served["flex"][0]]["org_id"]
    anonymous = by_id[unknown.value.response.headers["x-request-id"]]
    assert (anonymous["event"], anonymous["http_status"]) == ("refused", 401) and "org_id" not in anonymous
    for line in lines:
        assert key not in json.dumps(line)
        assert {"ts", "level", "logger", "msg"} <= line.keys()


def test_text_lines_carry_the_request_id(tmp_path: Path) -> None:
    request_id, text = one_request(tmp_path, FLEXSERVE_LOG_FORMAT="text")
    [line] = [line for line in text if f"[{request_id}]" in line]
    assert " INFO flexserve.requests " in line and "event=request" in line
    assert "served_tier=default" in line and "status=completed" in line and "completion_tokens=4" in line
    assert not any(line.startswith("{") for line in text)


def test_the_request_log_can_be_turned_off(tmp_path: Path) -> None:
    request_id, text = one_request(tmp_path, FLEXSERVE_LOG_REQUESTS="false")
    assert not any(request_id in line for line in text)
    assert ledger(tmp_path, request_id)["status"] == "completed"


def test_a_bad_log_format_is_refused_at_start(tmp_path: Path) -> None:
    environ = {name: value for name, value in os.environ.items() if not name.startswith("FLEXSERVE_")}
    done = subprocess.run(
        [sys.executable, "-m", "flexserve.cli", "serve", "--home", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env={**environ, "FLEXSERVE_LOG_FORMAT": "xml"},
    )
    assert done.returncode != 0
    assert "log_format" in done.stderr and "'xml' is not json or text" in done.stderr


def _record(message: str, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("flexserve.test", logging.WARNING, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_a_line_written_while_serving_a_request_carries_its_id() -> None:
    token = request_id_var.set("req_abc")
    try:
        record = _record("engine slow")
        assert RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert (line["request_id"], line["level"], line["logger"], line["msg"]) \
        == ("req_abc", "warning", "flexserve.test", "engine slow")
    assert line["ts"].endswith("Z")
    # An id passed with the record (a decision made outside the request's task) wins.
    explicit = _record("flex refused", request_id="req_other", fields={"event": "flex_refused", "retry_after_s": 2.5})
    token = request_id_var.set("req_abc")
    try:
        RequestIdFilter().filter(explicit)
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(explicit))
    assert (line["request_id"], line["event"], line["retry_after_s"]) == ("req_other", "flex_refused", 2.5)
    text = TextFormatter().format(explicit)
    assert "[req_other]: flex refused event=flex_refused retry_after_s=2.5" in text
    # Outside any request: no id at all.
    bare = _record("started")
    RequestIdFilter().filter(bare)
    assert "request_id" not in json.loads(JsonFormatter().format(bare))


def test_configure_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="log_format must be one of json, text"):
        configure("warning", "xml")
