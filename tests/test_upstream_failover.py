"""Upstreams that turn requests away (429, 503, a connection that fails)
before any output: the request goes to another replica, or flex waits for
one, or the client gets 503 with Retry-After; a refused attempt is never
billed. Real servers on loopback, the official SDK as the client."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conftest import Gateway, ServerThread, usage_rows, wait_for
from flexserve.engines.base import EngineRequest
from flexserve.engines.upstream import UpstreamEngine
from flexserve.engines.upstream.engine import retry_after_seconds
from flexserve.errors import EngineOverloadedError
from test_error_shape import assert_envelope

MESSAGES = [{"role": "user", "content": "Say something."}]
PROMPT_TOKENS, COMPLETION_TOKENS = 9, 2


class Upstream:
    """A small upstream serving `model` as vLLM answers chat (whole or
    streamed), which turns its next `num_refusals` requests away (None: all)
    with `status` and, if set, `retry_after`; it records every request's id."""

    def __init__(self, name: str, model: str = "shared", num_refusals: int | None = 0,
                 status: int = 429, retry_after: str | None = None) -> None:
        self.name = name
        self.model = model
        self.num_refusals = num_refusals
        self.status = status
        self.retry_after = retry_after
        self.request_ids: list[str] = []
        self.server = ServerThread(Starlette(routes=[
            Route("/v1/models", self.models), Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]))

    @property
    def url(self) -> str:
        return self.server.url

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.request_ids.append(request.headers["x-request-id"])
        if self.num_refusals is None or self.num_refusals > 0:
            if self.num_refusals is not None:
                self.num_refusals -= 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return JSONResponse({"error": {"message": "The server is busy.", "type": "overloaded",
                                           "param": None, "code": self.status}},
                                status_code=self.status, headers=headers)
        words = ["from", f" {self.name}"]
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                 "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}
        head = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": self.model}
        if not body.get("stream"):
            return JSONResponse({
                "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            })

        async def sse() -> AsyncIterator[bytes]:
            for k, word in enumerate(words):
                choice = {"index": 0, "delta": {"content": word}, "logprobs": None,
                          "finish_reason": "stop" if k == len(words) - 1 else None}
                yield b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"
            yield b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")


@pytest.fixture
def upstreams() -> Iterator[Callable[..., Upstream]]:
    """Start upstreams on demand; those still running are stopped after the test."""
    with contextlib.ExitStack() as stack:
        def start(*args: Any, **kwargs: Any) -> Upstream:
            upstream = Upstream(*args, **kwargs)
            stack.enter_context(upstream.server)
            return upstream

        yield start


def _billed(gateway: Gateway, *request_ids: str) -> dict[str, list[tuple[int, int, str]]]:
    return {
        rid: [(row["prompt_tokens"], row["completion_tokens"], row["served_tier"])
              for row in usage_rows(gateway, rid)]
        for rid in request_ids
    }


@pytest.mark.parametrize("stream", [False, True])
def test_a_429_is_served_by_another_replica_and_billed_once(
    start_gateway: Callable[..., Gateway], upstreams: Callable[..., Upstream], stream: bool,
) -> None:
    busy = upstreams("busy", num_refusals=None, retry_after="30")
    steady = upstreams("steady")
    # Equal free slots: the first replica listed is tried first.
    gateway = start_gateway(engine="upstream", upstreams=[busy.url, steady.url])
    client = gateway.client()
    if stream:
        raw = client.chat.completions.with_raw_response.create(
            model="shared", messages=MESSAGES, stream=True  # type: ignore[arg-type]
        )
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        raw = client.chat.completions.with_raw_response.create(model="shared", messages=MESSAGES)  # type: ignore[arg-type]
        text = raw.parse().choices[0].message.content or ""
    request_id = raw.headers["x-request-id"]
    assert text == "from steady"
    # Both were asked under the gateway's request id; the refusal was not an answer.
    assert busy.request_ids == [request_id] and steady.request_ids == [request_id]
    wait_for(lambda: len(usage_rows(gateway, request_id)) == 1)
    assert _billed(gateway, request_id) == {request_id: [(PROMPT_TOKENS, COMPLETION_TOKENS, "default")]}
    assert 'flexserve_failovers_total{model="shared"} 1.0' in httpx.get(gateway.url + "/metrics").text


def test_the_only_replica_refusing_is_a_503_for_default_and_a_429_for_flex_never_billed(
    start_gateway: Callable[..., Gateway], upstreams: Callable[..., Upstream],
) -> None:
    busy = upstreams("busy", num_refusals=None, status=503, retry_after="7")
    other = upstreams("other", model="other")
    gateway = start_gateway(engine="upstream", upstreams=[busy.url, other.url])
    client = gateway.client()
    with pytest.raises(openai.InternalServerError) as default_error:
        client.chat.completions.create(model="shared", messages=MESSAGES)  # type: ignore[arg-type]
    response = default_error.value.response
    assert_envelope(response, 503, code="engine_overloaded")
    assert response.headers["retry-after"] == "7"  # what the upstream asked for
    # Flex waits for the replica instead, up to its own limit, and is refused then.
    with pytest.raises(openai.RateLimitError) as flex_error:
        client.chat.completions.create(
            model="shared", messages=MESSAGES, service_tier="flex",  # type: ignore[arg-type]
            extra_headers={"X-Flex-Max-Wait": "0.5"},
        )
    assert_envelope(flex_error.value.response, 429, code="resource_unavailable")
    refused = [default_error.value.response.headers["x-request-id"],
               flex_error.value.response.headers["x-request-id"]]
    # Asked once: while it pauses it is offered nothing (flex waited in the queue).
    assert busy.request_ids == refused[:1]
    # A request served after them is written after them: then none of theirs was.
    raw = client.chat.completions.with_raw_response.create(model="other", messages=MESSAGES)  # type: ignore[arg-type]
    served = raw.headers["x-request-id"]
    wait_for(lambda: len(usage_rows(gateway, served)) == 1)
    assert _billed(gateway, *refused) == {rid: [] for rid in refused}


def test_refused_flex_waits_and_is_served_once_the_replica_recovers(
    start_gateway: Callable[..., Gateway], upstreams: Callable[..., Upstream],
) -> None:
    upstream = upstreams("recovering", num_refusals=1, retry_after="1")
    gateway = start_gateway(engine="upstream", upstreams=[upstream.url])
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="shared", messages=MESSAGES, service_tier="flex",  # type: ignore[arg-type]
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.service_tier == "flex"
    assert completion.choices[0].message.content == "from recovering"
    assert upstream.request_ids == [request_id, request_id]  # refused, then served
    wait_for(lambda: len(usage_rows(gateway, request_id)) == 1)
    assert _billed(gateway, request_id) == {request_id: [(PROMPT_TOKENS, COMPLETION_TOKENS, "flex")]}


def test_a_replica_that_cannot_be_reached_fails_over(
    start_gateway: Callable[..., Gateway], upstreams: Callable[..., Upstream],
) -> None:
    gone = upstreams("gone")
    steady = upstreams("steady")
    gateway = start_gateway(engine="upstream", upstreams=[gone.url, steady.url])
    gone.server.__exit__(None, None, None)  # up when the gateway started, down now
    with pytest.raises(httpx.ConnectError):
        httpx.get(gone.url + "/v1/models")
    client = gateway.client()
    request_ids = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="shared", messages=MESSAGES)  # type: ignore[arg-type]
        assert raw.parse().choices[0].message.content == "from steady"
        request_ids.append(raw.headers["x-request-id"])
    assert steady.request_ids == request_ids
    wait_for(lambda: all(usage_rows(gateway, rid) for rid in request_ids))
    assert _billed(gateway, *request_ids) == {
        rid: [(PROMPT_TOKENS, COMPLETION_TOKENS, "default")] for rid in request_ids
    }


async def _hang_up_on_posts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server that lists one model, and drops the connection of any other
    request once it has read its head, without a byte of answer."""
    head = await reader.readuntil(b"\r\n\r\n")
    if head.startswith(b"GET /v1/models "):
        body = b'{"object":"list","data":[{"id":"dropper","object":"model"}]}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
    writer.close()


async def test_a_connection_dropped_before_any_answer_is_a_refusal() -> None:
    server = await asyncio.start_server(_hang_up_on_posts, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = UpstreamEngine(f"http://127.0.0.1:{port}")
    try:
        await engine.start()
        assert [card.id for card in engine.models()] == ["dropper"]
        request = EngineRequest.chat("req_dropped", "dropper", MESSAGES)
        with pytest.raises(EngineOverloadedError) as caught:
            async for _ in engine.generate(request):
                pass
        assert caught.value.retry_after is None  # it said nothing: the scheduler's own pause applies
    finally:
        await engine.close()
        server.close()
        await server.wait_closed()


async def test_a_429_says_how_long_to_wait(upstreams: Callable[..., Upstream]) -> None:
    busy = upstreams("busy", num_refusals=None, retry_after="12")
    engine = UpstreamEngine(busy.url)
    try:
        await engine.start()
        with pytest.raises(EngineOverloadedError) as caught:
            async for _ in engine.generate(EngineRequest.chat("req_busy", "shared", MESSAGES)):
                pass
    finally:
        await engine.close()
    assert caught.value.retry_after == 12.0 and "HTTP 429" in caught.value.message
    assert busy.request_ids == ["req_busy"]


def test_retry_after_in_seconds_or_as_a_date() -> None:
    now = time.time()
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("nan") is None
