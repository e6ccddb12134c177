"""The request path's CPU cost, in process: run as a script by ``flexserve bench hot-path``.

It is started by file path in a fresh interpreter whose ``PYTHONPATH`` picks
the FlexServe tree to measure (this one, or a baseline's ``src``), so it uses
only long-lived APIs (``create_app``, ``Accounts``, the sim engine,
``engines.upstream._relay_sse``) and prints one JSON object.

Figures are the minimum over repeats of the mean per request: on a shared
machine noise only ever adds time, so the minimum is the cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvloop

_Send = Callable[[dict[str, Any]], Awaitable[None]]

# An instant reply as an upstream streams it: role, content with finish, usage, [DONE].
SSE_REPLY = (
    b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"sim-instant",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"sim-instant",'
    b'"choices":[{"index":0,"delta":{"content":"lorem ipsum dolor sit amet consectetur adipiscing '
    b'elit sed do eiusmod tempor"},"logprobs":null,"finish_reason":"length"}]}\n\n'
    b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"sim-instant",'
    b'"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28}}\n\n'
    b"data: [DONE]\n\n"
)


def _best(runs: list[float]) -> float:
    return round(min(runs), 1)


async def request_costs(num_requests: int, repeats: int) -> dict[str, float]:
    """µs per request through the ASGI app (no sockets), in-process instant sim engine."""
    from flexserve.accounts import Accounts
    from flexserve.app import create_app
    from flexserve.config import load_settings
    from flexserve.engines.sim import SimEngine
    from flexserve.store.database import Database

    home = tempfile.mkdtemp(prefix="flexserve-hot-path-")
    settings = load_settings(
        overrides={"home": home, "engine": "sim", "sim_profile": "instant"}, environ={}
    )
    db = Database.from_url(settings.database_url)
    await db.migrate()
    accounts = Accounts(db)
    await accounts.create_org("bench")
    _, key = await accounts.create_key("bench")
    await db.close()
    app = create_app(settings, engines=[SimEngine("instant")])
    costs: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        for stream in (False, True):
            for tier in ("default", "flex"):
                body: dict[str, Any] = {
                    "model": "sim-instant", "max_tokens": 16, "service_tier": tier,
                    "messages": [{"role": "user", "content": "Say hello in five words."}],
                }
                if stream:
                    body |= {"stream": True, "stream_options": {"include_usage": True}}
                call = _asgi_call(app, key, orjson.dumps(body))
                for _ in range(200):  # warm-up: caches, first-time imports
                    await call()
                runs = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    for _ in range(num_requests):
                        await call()
                    runs.append((time.perf_counter() - started) / num_requests * 1e6)
                costs[f"{'stream' if stream else 'non-stream'}/{tier}"] = _best(runs)
    return costs


def _asgi_call(app: Any, key: str, raw: bytes) -> Callable[[], Awaitable[None]]:
    headers = [
        (b"host", b"127.0.0.1:8000"), (b"authorization", f"Bearer {key}".encode()),
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
    ]

    async def call() -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "app": app, "state": {},
        }
        body_sent = False
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            # The client never leaves. A future per call: a waiter cancelled
            # (the handler's disconnect watch) cancels the future it awaited.
            await asyncio.get_running_loop().create_future()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        if statuses != [200]:
            raise RuntimeError(f"the request answered {statuses}")

    return call


async def sse_relay_cost(num_replies: int, repeats: int) -> float:
    """µs to relay one instant reply (arriving in one read) into deltas."""
    import aiohttp

    from flexserve.engines.upstream import _relay_sse

    class _Protocol:
        _reading_paused = False

        def pause_reading(self, *args: Any, **kwargs: Any) -> None: ...

        def resume_reading(self, *args: Any, **kwargs: Any) -> None: ...

    class _Response:
        def __init__(self, content: aiohttp.StreamReader) -> None:
            self.content = content

    loop = asyncio.get_running_loop()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(num_replies):
            reader = aiohttp.StreamReader(_Protocol(), 1 << 16, loop=loop)  # type: ignore[arg-type]
            reader.feed_data(SSE_REPLY)
            reader.feed_eof()
            async for _delta in _relay_sse("probe", _Response(reader)):  # type: ignore[arg-type]
                pass
        runs.append((time.perf_counter() - started) / num_replies * 1e6)
    return _best(runs)


async def _main(num_requests: int, repeats: int) -> dict[str, Any]:
    return {
        "request_us": await request_costs(num_requests, repeats),
        "sse_relay_us": await sse_relay_cost(num_requests * 2, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    result = uvloop.run(_main(args.requests, args.repeats))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
