"""A FlexServe gateway in front of upstream servers: a real sim-engine server,
and small real servers that misbehave the ways upstreams do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conftest import Gateway, ServerThread, free_port, sim_model_id
from flexserve.engines.base import EngineRequest
from flexserve.engines.sim import SimModel
from flexserve.engines.sim.server import create_sim_app
from flexserve.engines.upstream import UpstreamEngine
from flexserve.scheduler.policy import SchedulerConfig
from flexserve.scheduler.scheduler import Scheduler, Ticket
from flexserve.tiers import ServiceTier
from test_error_shape import assert_envelope

MESSAGES = [{"role": "user", "content": "Summarise the flex tier."}]


@pytest.fixture(scope="module")
def sim_upstream() -> Iterator[ServerThread]:
    model = SimModel("h100-llama3-8b", speed=50.0, max_num_seqs=16)
    with ServerThread(create_sim_app(model)) as server:
        yield server


@pytest.fixture(scope="module")
def upstream_gateway(start_gateway: Callable[..., Gateway], sim_upstream: ServerThread) -> Gateway:
    return start_gateway(engine="upstream", upstreams=[sim_upstream.url])


def test_models_discovered_from_upstream(upstream_gateway: Gateway) -> None:
    assert "sim" in sim_model_id(upstream_gateway)


def test_non_stream_through_upstream(upstream_gateway: Gateway) -> None:
    model = sim_model_id(upstream_gateway)
    completion = upstream_gateway.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, service_tier="flex", seed=3
    )
    assert completion.service_tier == "flex"
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    assert len((completion.choices[0].message.content or "").split()) == 6


async def test_stream_relayed_chunk_by_chunk(upstream_gateway: Gateway) -> None:
    model = sim_model_id(upstream_gateway)
    client = upstream_gateway.async_client()
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 10  # one upstream token, one chunk
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert all(c.service_tier == "default" for c in chunks)


def test_replicas_share_the_load(start_gateway: Callable[..., Gateway], sim_upstream: ServerThread) -> None:
    model = SimModel("h100-llama3-8b", speed=50.0, max_num_seqs=16)
    with ServerThread(create_sim_app(model)) as second:
        gateway = start_gateway(engine="upstream", upstreams=[sim_upstream.url, second.url])
        with gateway.http() as http:
            assert http.get("/healthz").json()["models"] == {sim_model_id(gateway): 2}


# --- upstreams that fail -----------------------------------------------------


def _broken_upstream(mode: str) -> Starlette:
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": f"broken-{mode}", "object": "model"}]})

    async def chat(request: Request) -> Response:
        if mode == "500":
            return JSONResponse({"error": {"message": "CUDA out of memory"}}, status_code=500)
        if mode == "400":
            return JSONResponse({"error": {"message": "prompt is longer than the context", "param": "messages"}},
                                status_code=400)

        async def body() -> AsyncIterator[bytes]:
            chunk = b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"m",' \
                    b'"choices":[{"index":0,"delta":{"content":"partial"},"finish_reason":null}]}\n\n'
            yield chunk
            if mode == "midstream":
                await asyncio.sleep(0.05)
                raise RuntimeError("upstream crashed mid-stream")  # connection drops
            await asyncio.sleep(30)  # mode == "slow": never finishes

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture(scope="module")
def broken_gateway(start_gateway: Callable[..., Gateway]) -> Iterator[Gateway]:
    servers = [ServerThread(_broken_upstream(mode)) for mode in ("500", "400", "midstream", "slow")]
    for server in servers:
        server.__enter__()
    gateway = start_gateway(engine="upstream", upstreams=[s.url for s in servers], upstream_timeout=2.0)
    yield gateway
    for server in servers:
        server.__exit__(None, None, None)


def _post(gateway: Gateway, model: str, stream: bool = False) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "stream": stream},
        headers={"Authorization": f"Bearer {gateway.api_key}"},
        timeout=30,
    )


def test_upstream_500_is_a_502(broken_gateway: Gateway) -> None:
    error = assert_envelope(_post(broken_gateway, "broken-500"), 502, code="upstream_error")
    assert "CUDA out of memory" in error["message"]


def test_upstream_400_is_the_clients_400(broken_gateway: Gateway) -> None:
    error = assert_envelope(_post(broken_gateway, "broken-400"), 400, param="messages")
    assert "longer than the context" in error["message"]


def test_upstream_timeout_is_a_504(broken_gateway: Gateway) -> None:
    assert_envelope(_post(broken_gateway, "broken-slow"), 504, code="upstream_timeout")


def test_stream_failing_midway_ends_with_error_event(broken_gateway: Gateway) -> None:
    response = _post(broken_gateway, "broken-midstream", stream=True)
    assert response.status_code == 200
    text = response.text
    assert '"content":"partial"' in text
    assert "event: error" in text
    assert "[DONE]" not in text


def test_stream_failure_raises_in_the_sdk(broken_gateway: Gateway) -> None:
    client = broken_gateway.client()
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="broken-midstream", messages=MESSAGES, stream=True):  # type: ignore[arg-type]
            pass


def test_unreachable_upstream_does_not_stop_the_gateway(start_gateway: Callable[..., Gateway],
                                                        sim_upstream: ServerThread) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = start_gateway(engine="upstream", upstreams=[dead, sim_upstream.url])
    completion = gateway.client().chat.completions.create(
        model=sim_model_id(gateway), messages=MESSAGES, max_tokens=2  # type: ignore[arg-type]
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 2


# --- what is asked of the upstream ------------------------------------------


def _recording_upstream(seen: list[bool], intervals: list[int | None] | None = None) -> Starlette:
    """Answers as asked (a whole completion or SSE) and records `stream` (and
    `stream_interval`, into ``intervals``)."""

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "recorder", "object": "model"}]})

    async def chat(request: Request) -> Response:
        body = await request.json()
        seen.append(body.get("stream"))
        if intervals is not None:
            intervals.append(body.get("stream_interval"))
        if not body.get("stream"):
            return JSONResponse({
                "id": "x", "object": "chat.completion", "created": 0, "model": "recorder",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "two words"},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
            })

        async def sse() -> AsyncIterator[bytes]:
            head = b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"recorder","choices":'
            yield head + b'[{"index":0,"delta":{"content":"two"},"finish_reason":null}]}\n\n'
            yield head + b'[{"index":0,"delta":{"content":" words"},"finish_reason":"length"}]}\n\n'
            yield head + b'[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}\n\n'
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])


def test_whole_completion_asked_only_when_not_streamed_nor_preemptible(
    start_gateway: Callable[..., Gateway],
) -> None:
    seen: list[bool] = []
    with ServerThread(_recording_upstream(seen)) as server:
        gateway = start_gateway(engine="upstream", upstreams=[server.url])
        client = gateway.client()
        for tier in ("default", "priority", "flex"):
            completion = client.chat.completions.create(
                model="recorder", messages=MESSAGES, service_tier=tier  # type: ignore[arg-type]
            )
            assert completion.choices[0].message.content == "two words"
            assert completion.choices[0].finish_reason == "length"
            assert completion.usage is not None
            assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 2)
        chunks = list(client.chat.completions.create(
            model="recorder", messages=MESSAGES, stream=True  # type: ignore[arg-type]
        ))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "two words"
    # Default and priority: one JSON body; flex (abortable) and a client's stream: SSE.
    assert seen == [False, False, True, True]


def test_a_stream_interval_is_asked_only_for_runs_streamed_upstream_and_read_whole(
    start_gateway: Callable[..., Gateway],
) -> None:
    """upstream_stream_interval=4: flex not streamed to its client is asked in
    chunks of four; a client's stream (flex or default) token by token; default
    read whole is asked whole (no stream to chunk)."""
    seen: list[bool] = []
    intervals: list[int | None] = []
    with ServerThread(_recording_upstream(seen, intervals)) as server:
        gateway = start_gateway(engine="upstream", upstreams=[server.url], upstream_stream_interval=4)
        client = gateway.client()
        for tier, stream in (("flex", False), ("flex", True), ("default", True), ("default", False)):
            answer = client.chat.completions.create(
                model="recorder", messages=MESSAGES, service_tier=tier, stream=stream  # type: ignore[call-overload]
            )
            text = ("".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream
                    else answer.choices[0].message.content)
            assert text == "two words"
    assert seen == [True, True, True, False]
    assert intervals == [4, None, None, None]


@pytest.mark.parametrize("value", ["0", "-4", "four"])
def test_a_stream_interval_that_is_not_a_whole_number_of_tokens_is_refused_by_name(value: str) -> None:
    from flexserve.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="upstream_stream_interval"):
        load_settings(environ={"FLEXSERVE_UPSTREAM_STREAM_INTERVAL": value})


async def test_a_flex_run_read_whole_comes_in_chunks_and_is_counted_in_tokens(
    sim_upstream: ServerThread,
) -> None:
    """The scheduler in front of a real sim server, its upstream asking chunks
    of four for runs read whole: such a flex run of 10 tokens comes in 4
    deltas, a streamed one in 10; flex output is counted in tokens either way
    (the flex wait estimates' throughput), and the replica learns how many
    tokens a chunk carries (their drain estimates)."""
    engine = UpstreamEngine(sim_upstream.url, capacity=8, stream_interval=4)
    await engine.start()
    scheduler = Scheduler.from_engines([engine], SchedulerConfig(scrape_interval=0.05))
    await scheduler.start()
    try:
        model = engine.models()[0].id
        pool = scheduler.pool(model)

        async def flex(request_id: str, read_whole: bool) -> list[str]:
            request = EngineRequest.chat(request_id, model, MESSAGES, max_tokens=10, seed=7)
            request.read_whole = read_whole
            ticket = Ticket(request_id, model, ServiceTier.FLEX, "org-a", cost_tokens=100,
                            stream=not read_whole)
            return [delta.text async for delta in scheduler.stream(ticket, request) if delta.text]

        whole = await flex("whole", True)
        assert [len(text.split()) for text in whole] == [1, 4, 4, 1]
        assert pool.flex_history.output_done == 10
        assert pool.replicas[0].tokens_per_chunk == pytest.approx(4 + 0.1 * (10 / 4 - 4))
        streamed = await flex("streamed", False)
        assert [len(text.split()) for text in streamed] == [1] * 10
        assert "".join(streamed) == "".join(whole)
        assert pool.flex_history.output_done == 20
        assert pool.replicas[0].tokens_per_delta == pytest.approx(1.0)
        # Default its client reads whole comes as one JSON body, one delta of
        # 10 tokens: it teaches neither how the engine streams nor chunks.
        request = EngineRequest.chat("default", model, MESSAGES, max_tokens=10, seed=7, stream=False)
        request.read_whole = True
        ticket = Ticket("default", model, ServiceTier.DEFAULT, "org-a", cost_tokens=100, stream=False)
        assert [delta.text async for delta in scheduler.stream(ticket, request) if delta.text] == ["".join(whole)]
        assert pool.replicas[0].tokens_per_delta == pytest.approx(1.0)
        assert pool.replicas[0].tokens_per_chunk == pytest.approx(4 + 0.1 * (10 / 4 - 4))
    finally:
        await scheduler.close()
        await engine.close()


def test_an_upstreams_prefix_cache_hits_reach_the_client_and_the_ledger(
    start_gateway: Callable[..., Gateway],
) -> None:
    """The sim engine with vLLM's prefix caching behind the gateway: the same
    prompt twice, and the second answer's cached tokens are told and recorded."""
    from conftest import sql_rows, wait_for

    model = SimModel("h100-llama3-8b", speed=50.0, enable_prefix_caching=True)
    with ServerThread(create_sim_app(model)) as engine:
        gateway = start_gateway(engine="upstream", upstreams=[engine.url], org="prefix-cache")
        client = gateway.client()
        model_id = sim_model_id(gateway)
        messages = [{"role": "user", "content": " ".join(["same"] * 994)}]
        answers = [client.chat.completions.create(model=model_id, messages=messages, max_tokens=2)
                   for _ in range(2)]
    cached = [a.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
              for a in answers]
    assert cached == [0, 992]
    def recorded() -> list[int]:
        rows = sql_rows(gateway.db_url, "SELECT cached_tokens FROM usage_records ORDER BY id")
        return [r["cached_tokens"] for r in rows]

    wait_for(lambda: len(recorded()) == 2)
    assert recorded() == [0, 992]
