"""Flex end to end: a real gateway on loopback in front of a saturated sim
engine, driven by the official openai SDK and by raw HTTP clients."""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from collections import Counter
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
    # The 2,000 clients below share this process (and its GIL) with the gateway:
    # loaded, one may take seconds to send its first byte after connecting, or
    # its last after its first, which the slow-client timers would cut
    # (api/connections.py, tested on their own in test_connections.py).
    gateway = start_gateway(
        engines=[sim_engine(speed=1.0, max_num_seqs=2)], engine="sim", flex_headroom=0.5,
        max_queue=5000, keep_alive_timeout=120.0, header_timeout=120.0, body_timeout=120.0,
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
    assert set(entry) == {
        "model", "spare_capacity", "queue_depth", "estimated_wait_seconds",
        "estimated_wait_p90_seconds", "accepting", "place",
    }
    # Once default has held both slots (flex may take one) for a few seconds,
    # there is nothing to estimate a start from.
    with gateway.http() as http:
        wait_for(lambda: http.get("/v1/flex/status").json()["data"][0]["estimated_wait_p90_seconds"] is None)
        (entry,) = http.get("/v1/flex/status").json()["data"]
    assert entry["estimated_wait_seconds"] is None and entry["accepting"]


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

    async def crowd() -> tuple[int, int, Counter[str | int]]:
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
            early = [t for t in tasks if t.done()]
            outcomes = Counter(repr(t.exception()) if t.exception() else t.result() for t in early)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return depth, len(early), outcomes

    depth, finished_early, outcomes = asyncio.run(crowd())
    assert depth == num, f"{depth} waiting; answered early: {dict(outcomes)}"
    assert finished_early == 0
    with gateway.http() as http:
        wait_for(lambda: http.get("/v1/flex/status").json()["data"][0]["queue_depth"] == 0, timeout=30)
        metrics = http.get("/metrics").text
    assert f'flexserve_requests_total{{model="{model}",status="client_gone",tier="flex"}} {float(num)}' in metrics


def _wait_limit_buckets(gateway: Gateway) -> dict[str, float]:
    text = httpx.get(gateway.url + "/metrics").text
    prefix = "flexserve_flex_wait_limit_seconds_bucket{le=\""
    return {
        line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


async def _limit_applied(gateway: Gateway, model: str, client: openai.AsyncOpenAI) -> dict[str, float]:
    """Send one flex request that waits; return how the wait-limit buckets moved."""
    before = _wait_limit_buckets(gateway)
    task = asyncio.create_task(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=3, service_tier="flex"
    ))
    try:
        deadline = time.monotonic() + 10
        while _wait_limit_buckets(gateway).get("+Inf", 0) == before.get("+Inf", 0):
            assert time.monotonic() < deadline, "the flex request never reached the queue"
            await asyncio.sleep(0.05)
        after = _wait_limit_buckets(gateway)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.close()
    return {le: after[le] - before.get(le, 0) for le in after}


async def test_flex_wait_ends_before_a_default_sdk_gives_up(busy_gateway: tuple[Gateway, str]) -> None:
    """The SDK at its defaults waits 600 s for an answer (and says so in
    X-Stainless-Timeout): a flex request it sends is allowed to wait less than
    that, so a refusal reaches it as a 429 rather than as its own timeout."""
    gateway, model = busy_gateway
    default_client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key)
    moved = await _limit_applied(gateway, model, default_client)
    assert moved["540.0"] == 1  # 600 s read timeout: at most 540 s in the queue
    patient = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=gateway.api_key, timeout=900)
    moved = await _limit_applied(gateway, model, patient)
    # A 15-minute timeout (OpenAI's advice for flex) gets the server's whole 600 s.
    assert moved["540.0"] == 0 and moved["600.0"] == 1
