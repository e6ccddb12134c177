"""SIGTERM on a real `flexserve serve` process with requests in flight: those
that can finish within the grace do; at its end open streams get an error
event in OpenAI's shape and are billed for what they delivered (status
`server_shutdown`), a non-streamed request gets an enveloped 503 and is not
charged (status `aborted`); the ledger in the SQLite file says so."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import serve_process, wait_for
from test_error_shape import assert_envelope

MODEL = "llama3-8b-sim-h100"
MESSAGES = [{"role": "user", "content": "Write at length."}]
GRACE = 2.0
CONFIG = f"""
shutdown_grace = {GRACE}
usage_flush_interval = 0.02

[prices."{MODEL}"]
input = "1.00"
output = "2.00"
"""


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, str, Path]]:
    """A `flexserve serve` process over the sim engine at real speed (a long
    answer takes tens of seconds), its URL, demo key and home directory."""
    config = tmp_path / "flexserve.toml"
    config.write_text(CONFIG)
    with serve_process(tmp_path, "--engine", "sim", "--sim-speed", "1", "--config", str(config)) as (
        process, url, _
    ):
        yield process, url, (tmp_path / "demo_key").read_text().strip(), tmp_path


def _in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("flexserve_in_flight{"))


def _rows(home: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(home / "flexserve.db") as db:
        db.row_factory = sqlite3.Row
        return {row["request_id"]: dict(row) for row in db.execute("SELECT * FROM usage_records")}


class Stream(threading.Thread):
    """A streamed chat request read line by line in a thread."""

    def __init__(self, url: str, key: str, max_tokens: int) -> None:
        super().__init__()
        self.args = url, key, max_tokens
        self.lines: list[bytes] = []
        self.request_id = ""
        self.num_content = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        url, key, max_tokens = self.args
        try:
            with httpx.stream(
                "POST", url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                json={"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True},
            ) as response:
                self.request_id = response.headers["x-request-id"]
                for line in response.iter_lines():
                    if not line:
                        continue  # between events
                    self.lines.append(line.encode())
                    if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                        self.num_content += 1
        except BaseException as exc:  # handed to the test's thread
            self.error = exc


def test_sigterm_finishes_what_it_can_and_ends_the_rest_cleanly(
    gateway_process: tuple[subprocess.Popen[bytes], str, str, Path],
) -> None:
    process, url, key, home = gateway_process
    long_stream = Stream(url, key, max_tokens=6000)
    short_stream = Stream(url, key, max_tokens=60)
    whole: list[httpx.Response] = []
    whole_request = threading.Thread(target=lambda: whole.append(httpx.post(
        url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 6000},
    )))
    long_stream.start()
    whole_request.start()
    wait_for(lambda: long_stream.num_content >= 5 and _in_flight(url) == 2)
    short_stream.start()
    wait_for(lambda: _in_flight(url) == 3)
    process.send_signal(signal.SIGTERM)
    for thread in (long_stream, short_stream, whole_request):
        thread.join(timeout=60)
    # Exited by itself (uvicorn re-raises the signal it caught once it has shut down).
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert long_stream.error is None and short_stream.error is None

    # The short stream finished within the grace, as if nothing happened.
    assert short_stream.lines[-1] == b"data: [DONE]"
    # The long one was ended by the server: an error event, no [DONE].
    text = b"\n".join(long_stream.lines)
    assert b"[DONE]" not in text
    error = orjson.loads(long_stream.lines[long_stream.lines.index(b"event: error") + 1][len(b"data: "):])
    assert set(error) == {"error"}
    assert error["error"]["code"] == "server_shutting_down" and error["error"]["type"] == "api_error"
    assert set(error["error"]) == {"message", "type", "param", "code"}
    # The non-streamed one: OpenAI's envelope, with Retry-After and the request id.
    (response,) = whole
    assert_envelope(response, 503, code="server_shutting_down")
    assert response.headers["retry-after"] == "1"

    rows = _rows(home)
    short_row = rows[short_stream.request_id]
    assert (short_row["status"], short_row["completion_tokens"]) == ("completed", 60)
    # Billed exactly what it delivered, and said to be the server's doing.
    long_row = rows[long_stream.request_id]
    assert long_row["status"] == "server_shutdown"
    assert long_row["completion_tokens"] == long_stream.num_content
    assert long_row["output_cost_pico"] == long_stream.num_content * 2_000_000
    # The engine's work on the non-streamed one is recorded, at no charge.
    whole_row = rows[response.headers["x-request-id"]]
    assert whole_row["status"] == "aborted" and whole_row["completion_tokens"] > 0
    assert whole_row["output_cost_pico"] == whole_row["input_cost_pico"] == 0
    assert len(rows) == 3
