"""Connection hygiene against a real gateway on loopback: idle, slow-header
and slow-body connections are closed after their timeouts while real clients
keep working; past the connection caps new connections get a clean 503 and
the gateway recovers; requests waiting server-side are never cut."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from conftest import Gateway, serve_process, sim_engine, sim_model_id, wait_for

MESSAGES = [{"role": "user", "content": "Say hello."}]
# Short timeouts, so that the tests wait little; the tests never assert timings.
TIMEOUT = 0.4


def _connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def _chat_request(gateway: Gateway, body: bytes, content_length: int | None = None) -> bytes:
    length = len(body) if content_length is None else content_length
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: flexserve\r\n"
        b"Authorization: Bearer " + gateway.api_key.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n"
    ) + body


def _read_until_closed(sock: socket.socket, limit: float = 15.0) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    sock.settimeout(limit)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open; received {received!r}") from None
        if not chunk:
            return received
        received += chunk


def _trickle_until_closed(sock: socket.socket, drip: bytes, limit: float = 15.0) -> bytes:
    """Send ``drip`` every 0.1 s (each send would reset a naive timer) until
    the server closes; return what it sent."""
    sock.settimeout(0.1)
    received = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            try:
                sock.sendall(drip)
            except OSError:  # closed under us: the next recv says so
                pass
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server kept a trickling connection open; received {received!r}")


def _status_and_error(response: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return status, headers, error


def _metric(url: str, name: str) -> float:
    with httpx.Client(timeout=10) as http:
        text = http.get(url + "/metrics").text
    match = re.search(r"^" + re.escape(name) + r" ([0-9.e+]+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


def _sdk_works(gateway: Gateway, model: str) -> None:
    with gateway.client() as client:
        reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3)
    assert reply.choices[0].message.content


@pytest.fixture(scope="module")
def strict_gateway(start_gateway: Callable[..., Gateway]) -> tuple[Gateway, str]:
    gateway = start_gateway(
        engines=[sim_engine()], engine="sim", header_timeout=TIMEOUT, body_timeout=TIMEOUT,
        keep_alive_timeout=TIMEOUT,
    )
    return gateway, sim_model_id(gateway)


def test_idle_connection_is_closed_silently(strict_gateway: tuple[Gateway, str]) -> None:
    gateway, model = strict_gateway
    with _connect(gateway.url) as idle:
        _sdk_works(gateway, model)
        assert _read_until_closed(idle) == b""
    assert _metric(gateway.url, 'flexserve_connection_timeouts_total{phase="idle"}') >= 1


@pytest.mark.parametrize(
    ("prefix", "drip"),
    [
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: flexserve\r\n", b"X-Slow: 1\r\n"),
        (b"\r\n", b"\r\n"),  # blank lines before a request: no request ever begins
        (b"GET /v1/mod", b"e"),
    ],
    ids=["header-lines", "blank-lines", "request-line"],
)
def test_slow_headers_get_408_and_close(
    strict_gateway: tuple[Gateway, str], prefix: bytes, drip: bytes
) -> None:
    gateway, model = strict_gateway
    before = _metric(gateway.url, 'flexserve_connection_timeouts_total{phase="header"}')
    with _connect(gateway.url) as slow:
        slow.sendall(prefix)
        _sdk_works(gateway, model)
        response = _trickle_until_closed(slow, drip)
    status, headers, error = _status_and_error(response)
    assert status == 408
    assert error["code"] == "request_timeout"
    assert headers["x-request-id"].startswith("req_")
    assert _metric(gateway.url, 'flexserve_connection_timeouts_total{phase="header"}') == before + 1
    _sdk_works(gateway, model)


def test_slow_body_gets_408_and_close(strict_gateway: tuple[Gateway, str]) -> None:
    gateway, model = strict_gateway
    body = orjson.dumps({"model": model, "messages": MESSAGES, "max_tokens": 3})
    before = _metric(gateway.url, 'flexserve_connection_timeouts_total{phase="body"}')
    with _connect(gateway.url) as slow:
        slow.sendall(_chat_request(gateway, body[:10], content_length=len(body) + 10_000))
        _sdk_works(gateway, model)
        response = _trickle_until_closed(slow, b" ")
    status, headers, error = _status_and_error(response)
    assert status == 408
    assert error["code"] == "request_timeout"
    assert "body" in str(error["message"])
    assert _metric(gateway.url, 'flexserve_connection_timeouts_total{phase="body"}') == before + 1
    _sdk_works(gateway, model)


def test_whole_request_on_a_kept_alive_connection_is_served(strict_gateway: tuple[Gateway, str]) -> None:
    """Two requests one after the other on one connection, each sent whole:
    the timers between and within them do not get in the way."""
    gateway, model = strict_gateway
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        for _ in range(3):
            assert http.get("/healthz").status_code == 200


@pytest.fixture(scope="module")
def capped_gateway(start_gateway: Callable[..., Gateway]) -> tuple[Gateway, str]:
    gateway = start_gateway(
        engines=[sim_engine()], engine="sim", max_connections=12, max_connections_per_client=5,
        keep_alive_timeout=60.0,
    )
    return gateway, sim_model_id(gateway)


def _hold(stack: ExitStack, url: str, source: str, count: int) -> None:
    for _ in range(count):
        stack.enter_context(_connect(url, source))


def _refusal(url: str, source: str) -> tuple[int, dict[str, str], dict[str, object]]:
    with _connect(url, source) as refused:
        refused.sendall(b"GET /healthz HTTP/1.1\r\nHost: flexserve\r\n\r\n")
        return _status_and_error(_read_until_closed(refused))


def _open_connections(url: str) -> float:
    return _metric(url, "flexserve_connections_open") - 1  # less the scrape's own


def test_per_client_cap_refuses_that_client_only(capped_gateway: tuple[Gateway, str]) -> None:
    gateway, model = capped_gateway
    with ExitStack() as stack:
        _hold(stack, gateway.url, "127.0.0.2", 5)
        wait_for(lambda: _open_connections(gateway.url) == 5)
        status, headers, error = _refusal(gateway.url, "127.0.0.2")
        assert status == 503
        assert error["code"] == "too_many_connections"
        assert "your address" in str(error["message"])
        assert int(headers["retry-after"]) >= 1
        assert headers["x-request-id"].startswith("req_")
        _sdk_works(gateway, model)  # from 127.0.0.1
    wait_for(lambda: _open_connections(gateway.url) == 0)
    assert _metric(gateway.url, 'flexserve_connections_refused_total{reason="max_connections_per_client"}') >= 1
    _refused_then_recovers_from = "127.0.0.2"
    with _connect(gateway.url, _refused_then_recovers_from) as again:
        again.sendall(b"GET /healthz HTTP/1.1\r\nHost: flexserve\r\nConnection: close\r\n\r\n")
        assert _read_until_closed(again).startswith(b"HTTP/1.1 200")


def test_total_cap_refuses_cleanly_and_recovers(capped_gateway: tuple[Gateway, str]) -> None:
    gateway, model = capped_gateway
    before = _metric(gateway.url, 'flexserve_connections_refused_total{reason="max_connections"}')
    with ExitStack() as stack:
        for source in ("127.0.0.3", "127.0.0.4"):
            _hold(stack, gateway.url, source, 5)
        _hold(stack, gateway.url, "127.0.0.5", 2)
        status, headers, error = _refusal(gateway.url, "127.0.0.6")
        assert status == 503
        assert error["code"] == "too_many_connections"
        assert int(headers["retry-after"]) >= 1
        # The official SDK, sending its request at once, reads the 503 too (no reset).
        with gateway.client() as client, pytest.raises(openai.InternalServerError) as caught:
            client.models.list()
        assert caught.value.status_code == 503
        assert caught.value.code == "too_many_connections"
    # Once the held connections close, everyone is served again.
    wait_for(lambda: _open_connections(gateway.url) == 0)
    _sdk_works(gateway, model)
    assert _metric(gateway.url, 'flexserve_connections_refused_total{reason="max_connections"}') >= before + 2


@pytest.fixture(scope="module")
def one_slot_gateway(start_gateway: Callable[..., Gateway]) -> Iterator[tuple[Gateway, str]]:
    """One engine slot at real-time speed, and timeouts far shorter than the
    requests: what waits or streams here outlives every timer many times."""
    gateway = start_gateway(
        engines=[sim_engine(speed=1.0, max_num_seqs=1)], engine="sim", flex_headroom=0.0,
        header_timeout=0.2, body_timeout=0.2, keep_alive_timeout=0.2,
    )
    yield gateway, sim_model_id(gateway)


def test_waiting_and_streaming_requests_are_not_cut(one_slot_gateway: tuple[Gateway, str]) -> None:
    gateway, model = one_slot_gateway
    streamed: list[str] = []

    def stream() -> None:
        with gateway.client(timeout=60) as client:
            for chunk in client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=250, stream=True
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    streamed.append(chunk.choices[0].delta.content)

    holder = threading.Thread(target=stream)
    started = time.monotonic()
    holder.start()
    with httpx.Client(timeout=10) as http:
        wait_for(lambda: 'tier="default"} 1.0' in http.get(gateway.url + "/metrics").text)
    # The slot is taken: this flex request waits server-side, its connection silent.
    with gateway.client(timeout=60) as client:
        reply = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=5, service_tier="flex"
        )
    holder.join(timeout=60)
    # The point of the test: both outlived the timeouts several times over.
    assert time.monotonic() - started > 5 * 0.2
    assert reply.service_tier == "flex"
    assert reply.choices[0].message.content
    assert len(streamed) > 100
    assert _metric(gateway.url, 'flexserve_connection_timeouts_total{phase="header"}') == 0
    assert _metric(gateway.url, 'flexserve_connection_timeouts_total{phase="body"}') == 0


def test_stray_bytes_during_a_response_do_not_cut_it(one_slot_gateway: tuple[Gateway, str]) -> None:
    """A client that sends a CRLF after its body (as some do) and then waits
    gets its whole response; only then is the connection closed."""
    gateway, model = one_slot_gateway
    body = orjson.dumps({"model": model, "messages": MESSAGES, "max_tokens": 150})
    with _connect(gateway.url) as sock:
        sock.sendall(_chat_request(gateway, body) + b"\r\n")
        response = _read_until_closed(sock, limit=60)
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert orjson.loads(payload)["usage"]["completion_tokens"] > 0


def test_flexserve_serve_applies_the_guard_and_logs_once(tmp_path: Path) -> None:
    """The protections as `flexserve serve` starts them, with the summary log
    line an operator sees (one line for many refusals, not one each)."""
    env = {"FLEXSERVE_MAX_CONNECTIONS_PER_CLIENT": "2", "FLEXSERVE_HEADER_TIMEOUT": "0.3",
           "FLEXSERVE_KEEP_ALIVE_TIMEOUT": "30", "FLEXSERVE_BOOTSTRAP_DEMO": "false"}
    with serve_process(tmp_path, "--engine", "sim", env=env) as (_, url, log):
        with ExitStack() as stack:
            _hold(stack, url, "127.0.0.7", 2)
            for _ in range(5):
                assert _refusal(url, "127.0.0.7")[0] == 503
        with _connect(url) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert _status_and_error(_trickle_until_closed(slow, b"X-Slow: 1\r\n"))[0] == 408
        assert _metric(url, 'flexserve_connections_refused_total{reason="max_connections_per_client"}') == 5
        assert _metric(url, 'flexserve_connection_timeouts_total{phase="header"}') == 1
    lines = [line for line in log.read_text().splitlines() if "flexserve.api.connections" in line]
    # The first refusal is reported at once; the rest, and the timeout, in one
    # summary line when the interval is over (or not at all if the process
    # ended first): never one line per event.
    assert lines and len(lines) <= 2, lines
    assert "refused 1 connections" in lines[0] and "last from 127.0.0.7" in lines[0]
