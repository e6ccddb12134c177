"""The bare pass-through proxy: the floor for a Python gateway on this hardware.

Starlette on uvicorn (uvloop, httptools) and one pooled aiohttp session: the
request body is forwarded as it came, the answer relayed as it comes. No
auth, no validation, no scheduling, no record. Whatever FlexServe adds over
this is the cost of what it does. Run ``python -m flexserve.bench.passthrough
--upstream URL --port P``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def create_passthrough_app(upstream: str) -> Starlette:
    """A proxy that forwards ``POST /v1/chat/completions`` to ``upstream``."""
    url = upstream.rstrip("/") + "/v1/chat/completions"

    async def chat(request: Request) -> Response:
        session: aiohttp.ClientSession = request.app.state.session
        body = await request.body()
        upstream_response = await session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        )
        media_type = upstream_response.headers.get("Content-Type", "application/json")
        if media_type.startswith("text/event-stream"):

            async def relay() -> AsyncIterator[bytes]:
                async with upstream_response:
                    async for chunk in upstream_response.content.iter_any():
                        yield chunk

            return StreamingResponse(relay(), upstream_response.status, media_type=media_type)
        async with upstream_response:
            payload = await upstream_response.read()
        return Response(payload, upstream_response.status, media_type=media_type)

    async def health(request: Request) -> Response:
        return Response(b"ok")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector) as session:
            app.state.session = session
            yield

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True, help="Upstream base URL.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    uvicorn.run(create_passthrough_app(args.upstream), host=args.host, port=args.port,
                loop="uvloop", http="httptools", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
