"""An ``x-request-id`` on every response, including errors.

A pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streams). The
id is put in ``scope["state"]["request_id"]`` so handlers can record it.

It wraps Starlette's whole stack (``app.FlexServeApp.build_middleware_stack``),
outside Starlette's ServerErrorMiddleware: that one answers an unhandled
error with the ``send`` it was given, so a middleware inside it would never
see that 500 go out. The bare inference routes add the header themselves.
"""

from __future__ import annotations

import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flexserve.observability.logs import request_id_var


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = request_id_var.set(request_id)  # on every log line written while serving it
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
