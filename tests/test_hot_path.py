"""The request path's fast parts: the key cache, the upstream SSE relay, and
the chat route answered as bare ASGI ahead of Starlette."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conftest import ServerThread
from flexserve.accounts import Accounts, Principal
from flexserve.api.auth import KeyCache
from flexserve.app import create_app
from flexserve.config import load_settings
from flexserve.engines.base import Delta, Engine, EngineRequest, ModelCard, SequenceControl
from flexserve.engines.sim import SimEngine
from flexserve.engines.upstream import UpstreamEngine
from flexserve.store.database import Database


class CountingAccounts(Accounts):
    """Real accounts on real SQLite, counting (and slowing) the key lookups."""

    def __init__(self, db: Database, delay: float) -> None:
        super().__init__(db)
        self.num_lookups = 0
        self._delay = delay
        self.gate: asyncio.Event | None = None  # when set, lookups wait for it

    async def authenticate(self, api_key: str) -> Principal | None:
        self.num_lookups += 1
        await asyncio.sleep(self._delay)
        if self.gate is not None:
            await self.gate.wait()
        return await super().authenticate(api_key)


@pytest.fixture
async def accounts(tmp_path: Path) -> AsyncIterator[CountingAccounts]:
    db = Database.from_url(f"sqlite:///{tmp_path / 'keys.db'}")
    await db.migrate()
    yield CountingAccounts(db, delay=0.05)
    await db.close()


async def test_concurrent_misses_share_one_lookup(accounts: CountingAccounts) -> None:
    await accounts.create_org("acme")
    _, key = await accounts.create_key("acme")
    cache = KeyCache(accounts, ttl=5.0)
    principals = await asyncio.gather(*(cache.principal(key) for _ in range(50)))
    assert accounts.num_lookups == 1
    assert {p.org_name for p in principals if p is not None} == {"acme"}


async def test_hits_refresh_ahead_without_waiting(accounts: CountingAccounts) -> None:
    await accounts.create_org("acme")
    _, key = await accounts.create_key("acme")
    cache = KeyCache(accounts, ttl=2.0)
    assert await cache.principal(key) is not None
    await asyncio.sleep(1.1)  # past half its life, not yet expired
    accounts.gate = asyncio.Event()  # the refresh's lookup cannot finish
    # Answered from the cache while the refresh is still held (a hang fails here).
    assert await asyncio.wait_for(cache.principal(key), timeout=10) is not None
    assert accounts.num_lookups == 2  # the refresh started in the background
    accounts.gate.set()
    for _ in range(200):
        if not cache._lookups:
            break
        await asyncio.sleep(0.01)
    assert not cache._lookups


async def test_revoked_key_refused_within_ttl(accounts: CountingAccounts) -> None:
    await accounts.create_org("acme")
    key_id, key = await accounts.create_key("acme")
    cache = KeyCache(accounts, ttl=0.3)
    assert await cache.principal(key) is not None
    await accounts.revoke_key(key_id)
    await asyncio.sleep(0.35)
    assert await cache.principal(key) is None


async def test_unknown_key_cached_too(accounts: CountingAccounts) -> None:
    cache = KeyCache(accounts, ttl=5.0)
    for _ in range(3):
        assert await cache.principal("sk-fs-not-a-key") is None
    assert accounts.num_lookups == 1


_CHUNKS = [
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\r\n\r\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"Hel',  # a line split across reads
    b'lo"}}]}\r\n\r\ndata: {"choices":[{"index":0,"delta":{"content":" there"},',
    b'"finish_reason":"stop"}]}\n\n: a comment line\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n',
    b"data: [DONE]",  # no newline before the connection ends
]


def _awkward_upstream() -> Starlette:
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "awkward", "object": "model"}]})

    async def chat(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for chunk in _CHUNKS:
                yield chunk
                await asyncio.sleep(0.01)  # separate reads on the gateway's side

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture(scope="module")
def awkward_upstream() -> Iterator[ServerThread]:
    with ServerThread(_awkward_upstream()) as server:
        yield server


async def test_sse_relay_handles_any_framing(awkward_upstream: ServerThread) -> None:
    engine = UpstreamEngine(awkward_upstream.url)
    await engine.start()
    try:
        request = EngineRequest.chat("req_1", "awkward", [{"role": "user", "content": "hi"}])
        deltas = [delta async for delta in engine.generate(request)]
    finally:
        await engine.close()
    assert "".join(d.text for d in deltas) == "Hello there"
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 2


# --- the chat route, ahead of Starlette ------------------------------------------


class FailingEngine(Engine):
    """An engine with a bug: it fails before its first token, or after one."""

    name = "failing"

    @property
    def capacity(self) -> int:
        return 4

    def models(self) -> list[ModelCard]:
        return [ModelCard("fails-at-once"), ModelCard("fails-midway")]

    async def generate(self, request: EngineRequest, control: SequenceControl | None = None) -> AsyncIterator[Delta]:
        if request.model == "fails-midway":
            yield Delta("partial")
            await asyncio.sleep(0.01)
        raise RuntimeError("a bug in the engine")


@pytest.fixture(scope="module")
async def gateway_app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Starlette, str, str]]:
    """The app in process with its lifespan: a sim engine with one slot (so a
    second request waits) and an engine with a bug."""
    home = tmp_path_factory.mktemp("hot-path")
    settings = load_settings(overrides={"home": str(home), "engine": "sim"}, environ={})
    db = Database.from_url(settings.database_url)
    await db.migrate()
    accounts = Accounts(db)
    await accounts.create_org("acme")
    _, key = await accounts.create_key("acme")
    await db.close()
    sim = SimEngine("h100-llama3-8b", speed=1.0, max_num_seqs=1)
    app = create_app(settings, engines=[sim, FailingEngine()])
    async with app.router.lifespan_context(app):
        yield app, key, sim.models()[0].id


def _chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, **extra}


async def test_chat_is_answered_ahead_of_starlettes_middleware(gateway_app: tuple[Starlette, str, str]) -> None:
    app, key, model = gateway_app
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as http:
        ok = await http.post("/v1/chat/completions", json=_chat_body(model), headers=auth)
        assert ok.status_code == 200 and ok.json()["object"] == "chat.completion"
        # The route's own id, and no second one from RequestIdMiddleware.
        assert len(ok.headers.get_list("x-request-id")) == 1
        assert ok.headers["content-type"] == "application/json"
        assert int(ok.headers["content-length"]) == len(ok.content)
        refused = await http.post("/v1/chat/completions", json=_chat_body(model))
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
        assert len(refused.headers.get_list("x-request-id")) == 1
        stream = await http.post("/v1/chat/completions", json=_chat_body(model, stream=True), headers=auth)
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert stream.headers["cache-control"] == "no-cache"
        assert len(stream.headers.get_list("x-request-id")) == 1
        assert stream.text.startswith("data: {") and stream.text.endswith("data: [DONE]\n\n")
        # Other methods still go through Starlette's router: 405, with the middleware's id.
        wrong = await http.get("/v1/chat/completions", headers=auth)
        assert wrong.status_code == 405 and len(wrong.headers.get_list("x-request-id")) == 1
    # Mounted under a prefix by a proxy (ASGI root_path), as Starlette's router would match it.
    transport = httpx.ASGITransport(app, root_path="/gw")
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        ok = await http.post("/gw/v1/chat/completions", json=_chat_body(model), headers=auth)
        assert ok.status_code == 200 and len(ok.headers.get_list("x-request-id")) == 1


async def test_an_engine_bug_is_answered_with_the_envelope(gateway_app: tuple[Starlette, str, str]) -> None:
    app, key, _ = gateway_app
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as http:
        for body in (_chat_body("fails-at-once"), _chat_body("fails-midway")):
            failed = await http.post("/v1/chat/completions", json=body, headers=auth)
            assert failed.status_code == 500 and failed.headers["x-request-id"].startswith("req_")
            assert failed.json()["error"]["type"] == "api_error"
            assert failed.json()["error"]["code"] == "internal_error"
        cut = await http.post("/v1/chat/completions", json=_chat_body("fails-midway", stream=True), headers=auth)
    assert cut.status_code == 200
    assert '"content":"partial"' in cut.text and "[DONE]" not in cut.text
    event = cut.text.split("event: error\ndata: ")[1]
    assert orjson.loads(event)["error"]["code"] == "internal_error"


class RawClient:
    """Calls the app as an ASGI server would: the body in one message, then
    ``http.disconnect`` once ``leave()`` is called."""

    def __init__(self, app: Starlette, key: str, body: dict[str, Any]) -> None:
        self.app = app
        self.headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]
        self.body = orjson.dumps(body)
        self.num_receives = 0
        self.sent: list[dict[str, Any]] = []
        self._left = asyncio.Event()

    async def __call__(self) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "headers": self.headers, "state": {},
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
        }

        async def receive() -> dict[str, Any]:
            self.num_receives += 1
            if self.num_receives == 1:
                return {"type": "http.request", "body": self.body, "more_body": False}
            await self._left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            self.sent.append(message)

        await self.app(scope, receive, send)

    def leave(self) -> None:
        self._left.set()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


async def test_the_connection_is_watched_only_while_waiting_or_streaming(
    gateway_app: tuple[Starlette, str, str],
) -> None:
    app, key, model = gateway_app
    alone = RawClient(app, key, _chat_body(model))
    await alone()
    assert alone.sent[0]["status"] == 200
    assert alone.num_receives == 1  # admitted at once: its body was all it read
    streamed = RawClient(app, key, _chat_body(model, stream=True))
    await streamed()
    assert streamed.sent[0]["status"] == 200 and streamed.num_receives == 2
    # The only slot held by a long stream: the next request waits in the queue.
    holder = RawClient(app, key, _chat_body(model, stream=True, max_tokens=4000))
    holding = asyncio.create_task(holder())
    await until(lambda: len(holder.sent) >= 2)
    waiter = RawClient(app, key, _chat_body(model))
    waiting = asyncio.create_task(waiter())
    queue = app.state.services.scheduler.pools[model].queue
    await until(lambda: queue.num_waiting() == 1 and waiter.num_receives == 2)
    waiter.leave()  # its client goes: out of the queue at once, nobody to answer
    await asyncio.wait_for(waiting, 1.0)
    assert queue.num_waiting() == 0 and waiter.sent == []
    holder.leave()
    await asyncio.wait_for(holding, 5.0)
    assert holder.sent[-1]["more_body"] is True  # cut short: no last part
    metrics = app.state.services.metrics.render().decode()
    assert f'flexserve_requests_total{{model="{model}",status="client_gone",tier="default"}} 1.0' in metrics
    assert 'status="client_disconnected",tier="default"} 1.0' in metrics  # the holder
