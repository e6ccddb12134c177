"""The request path's fast parts: the key cache and the upstream SSE relay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conftest import ServerThread
from flexserve.accounts import Accounts, Principal
from flexserve.api.auth import KeyCache
from flexserve.engines.base import EngineRequest
from flexserve.engines.upstream import UpstreamEngine
from flexserve.store.database import Database


class CountingAccounts(Accounts):
    """Real accounts on real SQLite, counting (and slowing) the key lookups."""

    def __init__(self, db: Database, delay: float) -> None:
        super().__init__(db)
        self.num_lookups = 0
        self._delay = delay

    async def authenticate(self, api_key: str) -> Principal | None:
        self.num_lookups += 1
        await asyncio.sleep(self._delay)
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
    cache = KeyCache(accounts, ttl=0.4)
    assert await cache.principal(key) is not None
    await asyncio.sleep(0.25)  # past half its life, not yet expired
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await cache.principal(key) is not None
    assert loop.time() - started < 0.04  # answered from the cache, not after the lookup
    await asyncio.sleep(0.1)
    assert accounts.num_lookups == 2  # the refresh ran in the background


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
        request = EngineRequest(request_id="req_1", model="awkward",
                                messages=[{"role": "user", "content": "hi"}])
        deltas = [delta async for delta in engine.generate(request)]
    finally:
        await engine.close()
    assert "".join(d.text for d in deltas) == "Hello there"
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 2
