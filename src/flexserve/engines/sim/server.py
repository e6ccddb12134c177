"""The sim engine over HTTP: an OpenAI-compatible server with vLLM's metrics.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE),
``GET /metrics`` (Prometheus text, vLLM's names) and ``GET /health``.

The chat route is a bare ASGI app rather than a Starlette endpoint: with the
``instant`` profile this server is the yardstick for a gateway's overhead at
about 1,000 requests/s, so it parses with orjson, builds no request or
response objects, logs nothing per request and answers in one write. For
timed profiles a watcher task waits for the client's disconnect and cancels
the handler, which closes the model's generator and frees the sequence's
slot and KV cache — as vLLM aborts a request whose connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from flexserve.engines.base import Delta, EngineRequest, Usage
from flexserve.engines.sim.metrics import render_metrics
from flexserve.engines.sim.model import SimModel
from flexserve.errors import FlexServeError, InvalidRequestError, ModelNotFoundError

_JSON = "application/json"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"

__all__ = ["create_sim_app", "serve"]


class _Disconnect:
    """Cancels the handler's task when the client goes before the response ends."""

    __slots__ = ("_task", "_watcher", "disconnected", "finished")

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self.finished = False
        self._task = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.finished and self._task is not None:
            self.disconnected = True
            self._task.cancel()

    def close(self) -> None:
        self.finished = True
        self._watcher.cancel()

    def absorb(self) -> bool:
        """After a CancelledError: True (and the task un-cancelled) if we caused it."""
        if self.disconnected and self._task is not None:
            self._task.uncancel()
            return True
        return False


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client left while sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_json(send: Send, status: int, payload: bytes,
                     headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", _JSON.encode()), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def _send_error(send: Send, exc: FlexServeError) -> None:
    await _send_json(send, exc.status_code, orjson.dumps(exc.to_dict()), exc.headers)


def _content_text(content: Any) -> str:
    """A message's content as plain text; parts of an array are joined by newlines."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "\n".join(
            p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    raise InvalidRequestError("A message's content must be a string or an array.",
                              param="messages")


def _optional_int(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise InvalidRequestError(f"'{name}' must be an integer.", param=name)
    return value


class _ChatCompletions:
    """``POST /v1/chat/completions`` as a bare ASGI app (the benchmarks' hot path)."""

    def __init__(self, model: SimModel) -> None:
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            request, stream, include_usage = self._parse(body)
            if not self.model.instant:
                self.model.validate(request)
        except FlexServeError as exc:
            await _send_error(send, exc)
            return
        reply = _Reply(self.model.model_id, request.request_id)
        agen = self.model.generate(request)
        if self.model.instant:
            await self._respond_instant(send, agen, reply, stream, include_usage)
            return
        disconnect = _Disconnect(receive)
        try:
            if stream:
                await self._respond_stream(send, agen, reply, include_usage)
            else:
                await self._respond_whole(send, agen, reply)
        except asyncio.CancelledError:
            if not disconnect.absorb():
                raise
        finally:
            disconnect.close()
            await agen.aclose()

    def _parse(self, body: bytes) -> tuple[EngineRequest, bool, bool]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("You must provide a model parameter.", param="model")
        if model != self.model.model_id:
            raise ModelNotFoundError(model)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")
        normalized: list[dict[str, Any]] = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequestError("Each message needs a string 'role'.", param="messages")
            normalized.append({"role": m["role"], "content": _content_text(m.get("content"))})
        max_tokens = _optional_int(data, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _optional_int(data, "max_tokens")
        priority = _optional_int(data, "priority") or 0
        if priority and self.model.scheduling_policy != "priority":
            # vLLM refuses a priority it would not honour.
            raise InvalidRequestError(
                "Priority scheduling is not enabled on this server (--scheduling-policy fcfs).",
                param="priority",
            )
        stream = data.get("stream") or False
        options = data.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise InvalidRequestError("'stream' must be a boolean, 'stream_options' an object.",
                                      param="stream")
        stop = data.get("stop") or []
        if not isinstance(stop, (str, list)):
            raise InvalidRequestError("'stop' must be a string or an array.", param="stop")
        request = EngineRequest.chat(
            f"chatcmpl-{os.urandom(12).hex()}",
            model,
            normalized,
            max_tokens=max_tokens,
            stop=[stop] if isinstance(stop, str) else list(stop),
            seed=_optional_int(data, "seed"),
            priority=priority,
        )
        return request, stream, bool(options.get("include_usage"))

    async def _respond_instant(self, send: Send, agen: AsyncGenerator[Delta, None], reply: _Reply,
                               stream: bool, include_usage: bool) -> None:
        try:
            delta = await anext(agen)
        except FlexServeError as exc:
            await _send_error(send, exc)
            return
        finally:
            await agen.aclose()
        assert delta.usage is not None and delta.finish_reason is not None
        if not stream:
            await _send_json(send, 200, reply.whole(delta.text, delta.finish_reason, delta.usage))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        payload = reply.role_chunk() + reply.chunk(delta.text, delta.finish_reason)
        if include_usage:
            payload += reply.usage_chunk(delta.usage)
        await send({"type": "http.response.body", "body": payload + _DONE})

    async def _respond_whole(self, send: Send, agen: AsyncGenerator[Delta, None],
                             reply: _Reply) -> None:
        parts: list[str] = []
        try:
            async for delta in agen:
                parts.append(delta.text)
                if delta.finish_reason is not None and delta.usage is not None:
                    payload = reply.whole("".join(parts), delta.finish_reason, delta.usage)
                    await _send_json(send, 200, payload)
                    return
        except FlexServeError as exc:
            await _send_error(send, exc)

    async def _respond_stream(self, send: Send, agen: AsyncGenerator[Delta, None], reply: _Reply,
                              include_usage: bool) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await send({"type": "http.response.body", "body": reply.role_chunk(), "more_body": True})
        try:
            async for delta in agen:
                payload = reply.chunk(delta.text, delta.finish_reason)
                if delta.finish_reason is not None and delta.usage is not None and include_usage:
                    payload += reply.usage_chunk(delta.usage)
                await send({"type": "http.response.body", "body": payload, "more_body": True})
        except FlexServeError as exc:
            await send({"type": "http.response.body", "body": b"data: "
                        + orjson.dumps(exc.to_dict()) + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": _DONE})


class _Reply:
    """Serializes one completion in OpenAI's shapes (response and stream chunks)."""

    __slots__ = ("completion_id", "created", "model_id")

    def __init__(self, model_id: str, completion_id: str) -> None:
        self.model_id = model_id
        self.completion_id = completion_id
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.completion_id, "object": obj, "created": self.created,
                "model": self.model_id}

    def whole(self, text: str, finish_reason: str, usage: Usage) -> bytes:
        body = self._head("chat.completion")
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                            "logprobs": None, "finish_reason": finish_reason}]
        body["usage"] = _usage(usage)
        return orjson.dumps(body)

    def _chunk(self, delta: dict[str, str], finish_reason: str | None) -> bytes:
        body = self._head("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish_reason}]
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def role_chunk(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def chunk(self, text: str, finish_reason: str | None) -> bytes:
        return self._chunk({"content": text}, finish_reason)

    def usage_chunk(self, usage: Usage) -> bytes:
        body = self._head("chat.completion.chunk")
        body["choices"] = []
        body["usage"] = _usage(usage)
        return b"data: " + orjson.dumps(body) + b"\n\n"


def _usage(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def create_sim_app(model: SimModel) -> Starlette:
    """The sim engine's ASGI app; the model is shared state handed in, not a global."""
    models_body = orjson.dumps({"object": "list", "data": [{
        "id": model.model_id, "object": "model", "created": int(time.time()),
        "owned_by": "flexserve", "max_model_len": model.max_model_len,
    }]})

    async def list_models(request: Request) -> Response:
        return Response(models_body, media_type=_JSON)

    async def metrics(request: Request) -> Response:
        return Response(render_metrics(model), media_type=_PROMETHEUS)

    async def health(request: Request) -> Response:
        return Response(b"", status_code=200)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        envelope = {"error": {"message": exc.detail, "type": "invalid_request_error",
                              "param": None, "code": kind}}
        return Response(orjson.dumps(envelope), status_code=exc.status_code, media_type=_JSON)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await model.close()

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", _ChatCompletions(model), methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error})
    app.state.model = model
    return app


def serve(host: str = "127.0.0.1", port: int = 8100, **model_options: Any) -> None:
    """Run the sim engine until interrupted; ``model_options`` go to ``SimModel``."""
    model = SimModel(**model_options)
    uvicorn.run(create_sim_app(model), host=host, port=port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning", lifespan="on")

