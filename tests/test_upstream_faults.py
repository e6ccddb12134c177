"""Upstreams that hang: a real `flexserve sim-engine` process frozen with
SIGSTOP (it answers nothing and closes nothing). Requests waiting on it fail
over to another replica or end with a timely enveloped error, health notices
within seconds, and no client-visible message names an upstream's address."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import orjson
import pytest

from conftest import Gateway, free_port, usage_rows, wait_for
from flexserve.engines.base import EngineRequest
from flexserve.engines.upstream import UpstreamEngine
from flexserve.errors import EngineOverloadedError, EngineTimeoutError
from test_error_shape import assert_envelope

MODEL = "frozen-sim"
MESSAGES = [{"role": "user", "content": "Write at length."}]
# Timeouts short enough for a test, in the ratios of the defaults.
FAULT_SETTINGS: dict[str, Any] = {
    "replica_silent_after": 1.0,
    "upstream_first_token_timeout": 2.0,
    "upstream_idle_timeout": 1.0,
    "scrape_interval": 0.05,
}


class SimProcess:
    """`flexserve sim-engine` in its own process, which can be frozen."""

    def __init__(self, speed: float = 1.0) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flexserve.cli", "sim-engine", "--port", str(self.port),
             "--speed", str(speed), "--model-id", MODEL],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, "sim-engine exited"
            assert time.monotonic() < deadline, "sim-engine did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def processes() -> Iterator[list[SimProcess]]:
    """Sim-engine processes for the whole module, started side by side (each
    takes seconds to start): two to freeze, one to kill."""
    with ExitStack() as stack:
        started = [SimProcess() for _ in range(3)]
        for sim in started:
            stack.callback(sim.close)
        for sim in started:
            sim.wait_ready()
        yield started


@pytest.fixture
def sims(processes: list[SimProcess]) -> Iterator[Callable[[int], list[SimProcess]]]:
    """The first ``count`` processes to freeze, thawed after the test."""
    yield lambda count: processes[:count]
    for sim in processes[:2]:
        sim.thaw()


def _healthz(gateway: Gateway) -> httpx.Response:
    return httpx.get(gateway.url + "/healthz", timeout=5)


def _assert_no_address(message: str, *sims: SimProcess) -> None:
    assert "127.0.0.1" not in message and "http://" not in message, message
    for sim in sims:
        assert str(sim.port) not in message, message


@contextmanager
def _in_thread(call: Callable[[], Any]) -> Iterator[list[Any]]:
    """Run ``call`` in a thread; its result (or exception) is in the list after the block."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except Exception as exc:  # handed to the test's thread
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield out
    finally:
        thread.join(timeout=60)


def test_a_frozen_replica_is_noticed_and_its_request_fails_over(
    start_gateway: Callable[..., Gateway], sims: Callable[[int], list[SimProcess]],
) -> None:
    first, second = sims(2)
    gateway = start_gateway(engine="upstream", upstreams=[first.url, second.url], **FAULT_SETTINGS)
    assert _healthz(gateway).json()["models"] == {MODEL: 2}
    client = gateway.client(timeout=60)
    # Non-streamed: the upstream is asked for one JSON body, which a frozen
    # replica never sends; only health can end the wait before upstream_timeout.
    with _in_thread(lambda: client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=400,  # type: ignore[arg-type]
    )) as result:
        # Equal free slots: the first replica listed takes it.
        wait_for(lambda: b'vllm:num_requests_running{engine="0",model_name="frozen-sim"} 1'
                 in httpx.get(first.url + "/metrics").content)
        first.freeze()
        wait_for(lambda: _healthz(gateway).json()["models"] == {MODEL: 1})
    raw = result[0]
    assert not isinstance(raw, Exception), raw
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 400
    request_id = raw.headers["x-request-id"]
    wait_for(lambda: len(usage_rows(gateway, request_id)) == 1)
    (row,) = usage_rows(gateway, request_id)
    assert (row["status"], row["completion_tokens"]) == ("completed", 400)
    metrics = httpx.get(gateway.url + "/metrics").text
    assert f'flexserve_failovers_total{{model="{MODEL}"}} 1.0' in metrics
    # A model with one healthy replica left is still served: new work goes there.
    assert _healthz(gateway).status_code == 200
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, stream=True,  # type: ignore[arg-type]
    ))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 5
    # With every replica frozen the model is down: /healthz says so, and a
    # request gets an enveloped 503 at once instead of waiting.
    second.freeze()
    wait_for(lambda: _healthz(gateway).status_code == 503)
    assert _healthz(gateway).json()["models"] == {MODEL: 0}
    response = httpx.post(
        gateway.url + "/v1/chat/completions", timeout=30,
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5},
    )
    error = assert_envelope(response, 503, code="engine_unavailable")
    _assert_no_address(error["message"], first, second)


def test_a_stream_whose_replica_freezes_ends_with_an_error_event(
    start_gateway: Callable[..., Gateway], sims: Callable[[int], list[SimProcess]],
) -> None:
    (sim,) = sims(1)
    gateway = start_gateway(engine="upstream", upstreams=[sim.url], **FAULT_SETTINGS)
    lines: list[bytes] = []
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", timeout=30,
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5000, "stream": True},
    ) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            lines.append(line.encode())
            if len(lines) == 10:
                sim.freeze()
    text = b"\n".join(lines)
    assert b"[DONE]" not in text
    assert b"event: error" in text
    error = orjson.loads(lines[lines.index(b"event: error") + 1].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_timeout"
    assert f"replica 1 of `{MODEL}`" in error["message"]
    _assert_no_address(error["message"], sim)
    # The engine failed it: recorded, not charged.
    wait_for(lambda: len(usage_rows(gateway, request_id)) == 1)
    assert usage_rows(gateway, request_id)[0]["status"] == "error"


def test_a_replica_slow_to_answer_its_metrics_is_not_taken_as_down(
    start_gateway: Callable[..., Gateway], sims: Callable[[int], list[SimProcess]],
) -> None:
    """A read that takes seconds (a busy vLLM on a few cores) is waited for up
    to half of ``replica_silent_after``: frozen for less than that, the
    replica stays healthy — not failed after three reads cut short — and a
    flex request sent meanwhile runs once the read answers."""
    (sim,) = sims(1)
    gateway = start_gateway(engine="upstream", upstreams=[sim.url],
                            **{**FAULT_SETTINGS, "replica_silent_after": 20.0})
    assert _healthz(gateway).json()["models"] == {MODEL: 1}
    sim.freeze()
    seen: set[int] = set()
    with _in_thread(lambda: gateway.client(timeout=60).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, service_tier="flex",  # type: ignore[arg-type]
    )) as result:
        frozen_until = time.monotonic() + 8.0
        while time.monotonic() < frozen_until:
            seen.add(_healthz(gateway).json()["models"][MODEL])
            time.sleep(0.2)
        sim.thaw()
    assert seen == {1}, "the replica was taken as down while its reads were only slow"
    completion = result[0]
    assert not isinstance(completion, Exception), completion
    assert completion.service_tier == "flex"
    assert completion.usage is not None and completion.usage.completion_tokens == 5


async def test_an_upstream_silent_before_its_first_output_is_a_refusal(
    sims: Callable[[int], list[SimProcess]],
) -> None:
    (sim,) = sims(1)
    engine = UpstreamEngine(sim.url, first_token_timeout=0.5, idle_timeout=0.5)
    await engine.start()
    try:
        sim.freeze()
        request = EngineRequest.chat("req_frozen", MODEL, MESSAGES, max_tokens=5)
        with pytest.raises(EngineOverloadedError) as refused:
            async for _ in engine.generate(request):
                pass
        _assert_no_address(refused.value.message, sim)
    finally:
        await engine.close()


async def test_an_upstream_silent_mid_stream_is_a_timeout(sims: Callable[[int], list[SimProcess]]) -> None:
    (sim,) = sims(1)
    engine = UpstreamEngine(sim.url, first_token_timeout=5, idle_timeout=0.5)
    await engine.start()
    try:
        request = EngineRequest.chat("req_stalled", MODEL, MESSAGES, max_tokens=5000)
        num_deltas = 0
        with pytest.raises(EngineTimeoutError) as timed_out:
            async for _ in engine.generate(request):
                num_deltas += 1
                if num_deltas == 3:
                    sim.freeze()
        assert num_deltas >= 3
        _assert_no_address(timed_out.value.message, sim)
    finally:
        await engine.close()


def test_no_upstream_address_in_what_clients_read(
    start_gateway: Callable[..., Gateway], processes: list[SimProcess],
) -> None:
    sim = processes[2]
    # Load signals read once, at start: the requests meet the dead replica first.
    gateway = start_gateway(engine="upstream", upstreams=[sim.url], **{**FAULT_SETTINGS, "scrape_interval": 60})
    sim.process.send_signal(signal.SIGKILL)  # up when the gateway started, gone now
    sim.process.wait(timeout=30)
    for stream in (False, True):
        response = httpx.post(
            gateway.url + "/v1/chat/completions", timeout=30,
            headers={"Authorization": f"Bearer {gateway.api_key}"},
            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "stream": stream},
        )
        error = assert_envelope(response, 503)
        _assert_no_address(error["message"], sim)
        assert f"replica 1 of `{MODEL}`" in error["message"]


if os.name != "posix":  # SIGSTOP
    pytestmark = pytest.mark.skip("needs POSIX signals")
