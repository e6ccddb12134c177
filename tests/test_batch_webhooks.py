"""Batch webhooks end to end: a gateway in front of the sim engine, batches
made with the official SDK, and a real HTTP endpoint on loopback that records
what it is sent; signatures checked with OpenAI's SDK and with the snippet in
docs/api.md; the outbox read from the gateway's SQLite file."""

from __future__ import annotations

import base64
import io
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai.types.webhooks import (
    BatchCancelledWebhookEvent,
    BatchCompletedWebhookEvent,
    BatchFailedWebhookEvent,
)

from conftest import Gateway, _make_org, free_port, run_async, serve_process, sim_engine, sql_rows, wait_for
from flexserve.batches.webhooks import WebhookSender
from flexserve.config import ConfigError, load_settings
from flexserve.engines.sim import PROFILES
from flexserve.store.database import Database

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
DOCS = Path(__file__).resolve().parents[1] / "docs"
EVENT_TYPES = {
    "batch.completed": BatchCompletedWebhookEvent,
    "batch.cancelled": BatchCancelledWebhookEvent,
    "batch.failed": BatchFailedWebhookEvent,
}


@dataclass(frozen=True)
class Delivery:
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return dict(orjson.loads(self.body))


class Receiver:
    """A webhook endpoint on a loopback port: records every POST and answers
    the statuses queued in ``statuses`` first, then 200."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.deliveries: list[Delivery] = []
        self.statuses: list[int] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/openai"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver._lock:
                    receiver.deliveries.append(
                        Delivery({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def for_batch(self, batch_id: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.event["data"]["id"] == batch_id]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


def webhook_gateway(start_gateway: Callable[..., Gateway], url: str, speed: float = 200.0,
                    **settings: Any) -> Gateway:
    return start_gateway(
        engines=[sim_engine(speed=speed)], engine="sim", batch_window=4,
        batch_webhook_url=url, batch_webhook_secret=SECRET, batch_webhook_retry_first=0.05,
        **settings,
    )


def docs_verify() -> Callable[[str, dict[str, str], bytes], bool]:
    """The verification snippet of docs/api.md, as a reader would paste it."""
    section = (DOCS / "api.md").read_text().split("## Batch webhooks", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    namespace: dict[str, Any] = {}
    exec(match.group(1), namespace)
    return namespace["verify"]  # type: ignore[no-any-return]


def assert_signed(delivery: Delivery, batch_id: str, event_type: str) -> None:
    """Verified by OpenAI's SDK and by the docs' snippet; not with another secret."""
    client = openai.OpenAI(api_key="unused", webhook_secret=SECRET)
    event = client.webhooks.unwrap(delivery.body, delivery.headers)
    assert isinstance(event, EVENT_TYPES[event_type])
    assert event.type == event_type and event.data.id == batch_id
    assert docs_verify()(SECRET, delivery.headers, delivery.body)
    other = "whsec_" + base64.b64encode(bytes(32)).decode()
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(delivery.body, delivery.headers, secret=other)
    assert not docs_verify()(other, delivery.headers, delivery.body)
    body = delivery.event
    assert body == {"id": delivery.headers["webhook-id"], "object": "event",
                    "created_at": body["created_at"], "type": event_type,
                    "data": {"id": batch_id}}
    assert body["id"].startswith("evt_") and isinstance(body["created_at"], int)


def create_batch(gateway: Gateway, content: bytes | None = None, num_lines: int = 3,
                 max_tokens: int = 5) -> str:
    client = gateway.client()
    if content is None:
        model = PROFILES["h100-llama3-8b"].model_id
        content = b"".join(orjson.dumps({
            "custom_id": f"t{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": f"Question {i}"}]},
        }) + b"\n" for i in range(num_lines))
    file_id = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch").id
    return client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def wait_status(gateway: Gateway, batch_id: str, status: str) -> None:
    client = gateway.client()
    wait_for(lambda: client.batches.retrieve(batch_id).status == status, timeout=30)


def outbox(db_url: str, batch_id: str) -> dict[str, Any] | None:
    rows = sql_rows(db_url, "SELECT * FROM webhook_events WHERE batch_id = :b", b=batch_id)
    return rows[0] if rows else None


def is_state(db_url: str, batch_id: str, state: str, min_attempts: int = 1) -> bool:
    row = outbox(db_url, batch_id)
    return row is not None and row["state"] == state and row["attempts"] >= min_attempts


def test_a_completed_batch_sends_one_signed_batch_completed(
    start_gateway: Callable[..., Gateway], receiver: Receiver,
) -> None:
    gateway = webhook_gateway(start_gateway, receiver.url)
    batch_id = create_batch(gateway)
    wait_status(gateway, batch_id, "completed")
    wait_for(lambda: is_state(gateway.db_url, batch_id, "delivered"))
    [delivery] = receiver.for_batch(batch_id)
    assert_signed(delivery, batch_id, "batch.completed")
    assert delivery.headers["content-type"] == "application/json"
    row = outbox(gateway.db_url, batch_id)
    assert row is not None and row["attempts"] == 1 and row["id"] == delivery.event["id"]


def test_a_cancelled_batch_sends_batch_cancelled(
    start_gateway: Callable[..., Gateway], receiver: Receiver,
) -> None:
    gateway = webhook_gateway(start_gateway, receiver.url, speed=1.0)
    batch_id = create_batch(gateway, num_lines=20, max_tokens=50)
    gateway.client().batches.cancel(batch_id)
    wait_status(gateway, batch_id, "cancelled")
    wait_for(lambda: is_state(gateway.db_url, batch_id, "delivered"))
    [delivery] = receiver.for_batch(batch_id)
    assert_signed(delivery, batch_id, "batch.cancelled")


def test_a_batch_whose_input_does_not_validate_sends_batch_failed(
    start_gateway: Callable[..., Gateway], receiver: Receiver,
) -> None:
    gateway = webhook_gateway(start_gateway, receiver.url)
    batch_id = create_batch(gateway, content=b"{not json\n")
    wait_status(gateway, batch_id, "failed")
    wait_for(lambda: is_state(gateway.db_url, batch_id, "delivered"))
    [delivery] = receiver.for_batch(batch_id)
    assert_signed(delivery, batch_id, "batch.failed")


def test_an_endpoint_answering_500_gets_the_same_event_until_it_answers_2xx(
    start_gateway: Callable[..., Gateway], receiver: Receiver,
) -> None:
    receiver.statuses = [500, 500]
    gateway = webhook_gateway(start_gateway, receiver.url)
    batch_id = create_batch(gateway)
    wait_for(lambda: is_state(gateway.db_url, batch_id, "delivered", 3), timeout=30)
    deliveries = receiver.for_batch(batch_id)
    assert len(deliveries) == 3
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1
    assert len({d.body for d in deliveries}) == 1
    for delivery in deliveries:
        assert_signed(delivery, batch_id, "batch.completed")
    # A later event goes through; the delivered one is not sent again.
    later = create_batch(gateway)
    wait_for(lambda: is_state(gateway.db_url, later, "delivered"))
    assert len(receiver.for_batch(batch_id)) == 3
    assert len(receiver.for_batch(later)) == 1


def test_an_event_waits_for_an_endpoint_that_is_down(
    start_gateway: Callable[..., Gateway],
) -> None:
    receiver = Receiver()  # not listening yet
    gateway = webhook_gateway(start_gateway, receiver.url)
    batch_id = create_batch(gateway)
    wait_status(gateway, batch_id, "completed")
    wait_for(lambda: is_state(gateway.db_url, batch_id, "pending", 2))
    row = outbox(gateway.db_url, batch_id)
    assert row is not None and row["last_error"]
    receiver.start()
    try:
        wait_for(lambda: is_state(gateway.db_url, batch_id, "delivered"), timeout=30)
        [delivery] = receiver.for_batch(batch_id)
    finally:
        receiver.stop()
    assert delivery.event["id"] == row["id"]
    assert_signed(delivery, batch_id, "batch.completed")


def test_a_gateway_killed_with_events_undelivered_sends_them_after_its_restart(
    tmp_path: Path,
) -> None:
    """`flexserve serve` killed (SIGKILL) while its endpoint is down, then
    started again on the same database once the endpoint is up: the event
    recorded before the kill arrives, with the same id."""
    home = tmp_path / "home"
    home.mkdir()
    db_url = f"sqlite:///{home / 'flexserve.db'}"
    _, key = run_async(_make_org(db_url, "hook-org", admin=False))
    receiver = Receiver()
    env = {
        "FLEXSERVE_BATCH_WEBHOOK_URL": receiver.url,
        "FLEXSERVE_BATCH_WEBHOOK_SECRET": SECRET,
        "FLEXSERVE_BATCH_WEBHOOK_RETRY_FIRST": "0.05",
        "FLEXSERVE_BOOTSTRAP_DEMO": "false",
    }
    args = ("--engine", "sim", "--sim-speed", "200")
    with serve_process(home, *args, env=env) as (process, url, _):
        gateway = Gateway(url, key, load_settings(environ={}), db_url)
        batch_id = create_batch(gateway)
        wait_for(lambda: is_state(db_url, batch_id, "pending", 1), timeout=30)
        process.kill()
        process.wait(timeout=10)
    recorded = outbox(db_url, batch_id)
    assert recorded is not None and recorded["state"] == "pending"
    receiver.start()
    try:
        with serve_process(home, *args, env=env):
            wait_for(lambda: is_state(db_url, batch_id, "delivered"), timeout=30)
            [delivery] = receiver.for_batch(batch_id)
    finally:
        receiver.stop()
    assert delivery.headers["webhook-id"] == recorded["id"]
    assert_signed(delivery, batch_id, "batch.completed")


@pytest.mark.parametrize(("settings", "named"), [
    ({"batch_webhook_secret": ""}, "batch_webhook_secret"),
    ({"batch_webhook_secret": "s3cret-that-is-long-enough-but-unprefixed"}, "batch_webhook_secret"),
    ({"batch_webhook_secret": "whsec_not base64!"}, "batch_webhook_secret"),
    ({"batch_webhook_secret": "whsec_" + base64.b64encode(b"short").decode()},
     "batch_webhook_secret"),
    ({"batch_webhook_url": "ftp://example.com/hook"}, "batch_webhook_url"),
])
async def test_a_webhook_setting_that_cannot_work_stops_the_start(
    settings: dict[str, str], named: str,
) -> None:
    values = {"batch_webhook_url": "http://127.0.0.1:9/hook", "batch_webhook_secret": SECRET,
              **settings}
    db = Database.from_url("sqlite://")
    try:
        with pytest.raises(ConfigError, match=named):
            WebhookSender(db, load_settings(overrides=values, environ={}))
    finally:
        await db.close()
