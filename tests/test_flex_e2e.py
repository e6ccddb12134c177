"""Flex end to end: a real gateway on loopback in front of a saturated sim
engine, driven by the official openai SDK and by raw HTTP clients."""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from collections.abc import Callable, Iterator

import aiohttp
import httpx
import openai
import pytest

from conftest import Gateway, sim_engine, sim_model_id, wait_for

MESSAGES = [{"role": "user", "content": "Label this record."}]


@pytest.fixture(scope="module")
def busy_gateway(start_gateway: Callable[..., Gateway]) -> Iterator[tuple[Gateway, str]]:
    """A gateway whose only replica (two slots) is held by long default streams
    (24 s each at speed 1: no gap in which a flex request could slip in)."""
    gateway = start_gateway(
        engines=[sim_engine(speed=1.0, max_num_seqs=2)], engine="sim", flex_headroom=0.5,
        max_queue=5000,
    )
    model = sim_model_id(gateway)
    stop = threading.Event()

    def hold() -> None:
        client = gateway.client()
        while not stop.is_set():
            stream = client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=4000, stream=True
            )
            for _ in stream:
                if stop.is_set():
                    stream.close()
                    break

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    for thread in holders:
        thread.start()
    with gateway.http() as http:
        wait_for(lambda: http.get("/metrics").text.count('flexserve_in_flight{model="%s",tier="default"} 2.0' % model) == 1)
    yield gateway, model
    stop.set()
    for thread in holders:
        thread.join(timeout=30)


def test_flex_gets_429_with_retry_after_within_its_max_wait(busy_gateway: tuple[Gateway, str]) -> None:
    gateway, model = busy_gateway
    client = gateway.client()
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=5, service_tier="flex",
            extra_headers={"X-Flex-Max-Wait": "1"},
        )
    elapsed = time.monotonic() - started
    assert elapsed < 2.0
    error = caught.value
    assert error.status_code == 429
    assert error.code == "resource_unavailable"
    assert error.type == "resource_unavailable"
    assert error.param is None
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.json()["error"]["message"]


def test_default_waits_instead_of_429(busy_gateway: tuple[Gateway, str]) -> None:
    """The header only bounds flex: default queues for the busy replica instead
    of being refused (the client gives up first here, after a second)."""
    gateway, model = busy_gateway
    with gateway.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", headers={"X-Flex-Max-Wait": "0"}, timeout=1.0,
                  json={"model": model, "messages": MESSAGES, "max_tokens": 2})


def test_bad_flex_max_wait_header(busy_gateway: tuple[Gateway, str]) -> None:
    gateway, model = busy_gateway
    with gateway.http() as http:
        response = http.post("/v1/chat/completions", headers={"X-Flex-Max-Wait": "soon"},
                             json={"model": model, "messages": MESSAGES, "service_tier": "flex"})
    assert response.status_code == 400
    assert "X-Flex-Max-Wait" in response.json()["error"]["message"]


def test_flex_status_shows_no_spare_capacity(busy_gateway: tuple[Gateway, str]) -> None:
    gateway, model = busy_gateway
    with gateway.http() as http:
        body = http.get("/v1/flex/status").json()
        assert httpx.get(gateway.url + "/v1/flex/status").status_code == 401
    assert body["object"] == "list"
    (entry,) = body["data"]
    assert entry["model"] == model
    assert entry["spare_capacity"] == 0.0
    assert set(entry) == {"model", "spare_capacity", "queue_depth", "estimated_wait_seconds", "accepting"}


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def test_two_thousand_waiting_flex_connections(busy_gateway: tuple[Gateway, str]) -> None:
    """2,000 flex requests wait at once without error; when their clients
    leave, the queue empties and none of them ever ran."""
    gateway, model = busy_gateway
    num = 2000
    _raise_fd_limit(3 * num + 512)

    async def crowd() -> tuple[int, int]:
        connector = aiohttp.TCPConnector(limit=0)
        headers = {"Authorization": f"Bearer {gateway.api_key}", "X-Flex-Max-Wait": "120"}
        body = {"model": model, "messages": MESSAGES, "max_tokens": 3, "service_tier": "flex"}
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one() -> int:
                async with session.post(gateway.url + "/v1/chat/completions", json=body, headers=headers) as r:
                    return r.status

            tasks = [asyncio.create_task(one()) for _ in range(num)]
            deadline = time.monotonic() + 60
            depth = 0
            async with session.get(gateway.url + "/v1/flex/status", headers=headers) as r:
                depth = (await r.json())["data"][0]["queue_depth"]
            while depth < num and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                async with session.get(gateway.url + "/v1/flex/status", headers=headers) as r:
                    depth = (await r.json())["data"][0]["queue_depth"]
            finished_early = sum(1 for t in tasks if t.done())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return depth, finished_early

    depth, finished_early = asyncio.run(crowd())
    assert depth == num
    assert finished_early == 0
    with gateway.http() as http:
        wait_for(lambda: http.get("/v1/flex/status").json()["data"][0]["queue_depth"] == 0, timeout=30)
        metrics = http.get("/metrics").text
    assert f'flexserve_requests_total{{model="{model}",status="client_gone",tier="flex"}} {float(num)}' in metrics
