"""The sim engine over HTTP: an OpenAI-compatible server with vLLM's metrics.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (JSON or SSE), ``POST /v1/embeddings``,
``GET /metrics`` (Prometheus text, vLLM's names), ``GET /health``, and vLLM's
own ``POST /tokenize`` and ``POST /detokenize`` (the sim tokenizer's ids). The
request body goes to the model whole, so the server speaks everything the
in-process sim does (tools, structured output, logprobs, ``n``…) and refuses
what it refuses, with a 400 in vLLM's envelope (OpenAI's members, ``type``
``BadRequestError`` and the status as ``code``) naming the parameter.

The inference routes are bare ASGI apps rather than Starlette endpoints: with
the ``instant`` profile this server is the yardstick for a gateway's overhead
at about 1,000 requests/s, so it parses with orjson, builds no request or
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

from flexserve.engines.base import Delta, EngineOp, EngineRequest, Usage
from flexserve.engines.sim.metrics import render_metrics
from flexserve.engines.sim.model import SimModel
from flexserve.engines.sim.replies import (
    DONE,
    Assembled,
    ChatReply,
    CompletionReply,
    EmbeddingReply,
)
from flexserve.engines.sim.tokenizer import chat_token_ids, render_token_ids, text_token_ids
from flexserve.errors import FlexServeError, InvalidRequestError, ModelNotFoundError

_JSON = "application/json"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

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


# vLLM's error envelope: OpenAI's members, with the type named after the HTTP
# status and the status itself as the code.
_VLLM_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
                     503: "ServiceUnavailableError"}


def _vllm_error(exc: FlexServeError) -> bytes:
    return orjson.dumps({"error": {
        "message": exc.message,
        "type": _VLLM_ERROR_TYPES.get(exc.status_code, "InternalServerError"),
        "param": exc.param,
        "code": exc.status_code,
    }})


async def _send_error(send: Send, exc: FlexServeError) -> None:
    await _send_json(send, exc.status_code, _vllm_error(exc), exc.headers)


def _request_id(scope: Scope) -> str | None:
    """The client's X-Request-Id, which vLLM makes the answer's id (after its
    `chatcmpl-` or `cmpl-`)."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return value.decode("latin-1") or None
    return None


def _json_object(body: bytes, model_id: str) -> dict[str, Any]:
    """A request body that must be a JSON object, naming this model if any."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    model = data.get("model")
    if model is not None and model != model_id:
        raise ModelNotFoundError(str(model))
    return data


def _optional_int(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise InvalidRequestError(f"'{name}' must be an integer.", param=name)
    return value


class _InferenceRoute:
    """A POST inference route as a bare ASGI app: a body in, the model's deltas
    out, whole or as server-sent events. Subclasses name their operation and
    their reply's shapes."""

    op: EngineOp = "chat"
    id_prefix = "chatcmpl"

    def __init__(self, model: SimModel) -> None:
        self.model = model

    def check(self, data: dict[str, Any]) -> None:
        """Refuse what this route needs to be well-formed before the model reads it."""

    def reply(self, request: EngineRequest) -> ChatReply | CompletionReply | EmbeddingReply:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            request, stream, include_usage = self._parse(body, _request_id(scope))
            if not self.model.instant:
                self.model.validate(request)
        except FlexServeError as exc:
            await _send_error(send, exc)
            return
        agen = self.model.generate(request)
        if self.model.instant:
            await self._respond_instant(send, agen, request, stream, include_usage)
            return
        disconnect = _Disconnect(receive)
        try:
            if stream:
                await self._respond_stream(send, agen, self.reply(request), include_usage)
            else:
                await self._respond_whole(send, agen, self.reply(request))
        except asyncio.CancelledError:
            if not disconnect.absorb():
                raise
        finally:
            disconnect.close()
            await agen.aclose()

    def _parse(self, body: bytes, request_id: str | None) -> tuple[EngineRequest, bool, bool]:
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
        self.check(data)
        priority = _optional_int(data, "priority") or 0
        if priority and self.model.scheduling_policy != "priority":
            # vLLM refuses a priority it would not honour.
            raise InvalidRequestError(
                "Priority scheduling is not enabled on this server (--scheduling-policy fcfs).",
                param="priority",
            )
        interval = _optional_int(data, "stream_interval")
        if interval is not None and interval < 1:
            # vLLM's per-request `stream_interval`: tokens batched into each chunk.
            raise InvalidRequestError("'stream_interval' must be at least 1.", param="stream_interval")
        stream = data.get("stream") or False
        options = data.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise InvalidRequestError("'stream' must be a boolean, 'stream_options' an object.",
                                      param="stream")
        # The whole body goes to the model, which reads what it honours from it.
        reply_id = f"{self.id_prefix}-{request_id or os.urandom(12).hex()}"
        request = EngineRequest(reply_id, model, data, self.op, priority, stream)
        return request, stream, bool(options.get("include_usage"))

    async def _respond_instant(self, send: Send, agen: AsyncGenerator[Delta, None],
                               request: EngineRequest, stream: bool, include_usage: bool) -> None:
        try:
            deltas = [delta async for delta in agen]
        except FlexServeError as exc:
            await _send_error(send, exc)
            return
        finally:
            await agen.aclose()
        reply = self.reply(request)
        last = deltas[-1]
        assert last.usage is not None
        # One choice of plain text (the benchmarks' case) is written without assembling.
        plain = (reply if isinstance(reply, ChatReply) and len(deltas) == 1
                 and last.tool_calls is None and last.logprobs is None else None)
        if not stream:
            if plain is not None:
                payload = plain.whole_text(last.text, last.finish_reason or "stop", last.usage)
            else:
                payload = reply.whole(_assemble(deltas))
            await _send_json(send, 200, payload)
            return
        assert not isinstance(reply, EmbeddingReply)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        parts = [reply.open()]
        if plain is not None:
            parts.append(plain.text_chunk(last.text, last.finish_reason))
        else:
            parts.extend(reply.chunk(delta) for delta in deltas)
        if include_usage:
            parts.append(reply.usage_chunk(last.usage))
        parts.append(DONE)
        await send({"type": "http.response.body", "body": b"".join(parts)})

    async def _respond_whole(self, send: Send, agen: AsyncGenerator[Delta, None],
                             reply: ChatReply | CompletionReply | EmbeddingReply) -> None:
        assembled = Assembled()
        try:
            async for delta in agen:
                assembled.add(delta)
        except FlexServeError as exc:
            await _send_error(send, exc)
            return
        await _send_json(send, 200, reply.whole(assembled))

    async def _respond_stream(self, send: Send, agen: AsyncGenerator[Delta, None],
                              reply: ChatReply | CompletionReply | EmbeddingReply,
                              include_usage: bool) -> None:
        assert not isinstance(reply, EmbeddingReply)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        opening = reply.open()
        if opening:
            await send({"type": "http.response.body", "body": opening, "more_body": True})
        usage: Usage | None = None
        try:
            async for delta in agen:
                usage = delta.usage or usage
                await send({"type": "http.response.body", "body": reply.chunk(delta),
                            "more_body": True})
        except FlexServeError as exc:
            await send({"type": "http.response.body", "body": b"data: " + _vllm_error(exc)
                        + b"\n\n", "more_body": True})
        else:
            if include_usage and usage is not None:
                await send({"type": "http.response.body", "body": reply.usage_chunk(usage),
                            "more_body": True})
        await send({"type": "http.response.body", "body": DONE})


def _assemble(deltas: list[Delta]) -> Assembled:
    assembled = Assembled()
    for delta in deltas:
        assembled.add(delta)
    return assembled


class _ChatCompletions(_InferenceRoute):
    """``POST /v1/chat/completions``; with the ``instant`` profile, the benchmarks' hot path."""

    op: EngineOp = "chat"
    id_prefix = "chatcmpl"

    def check(self, data: dict[str, Any]) -> None:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequestError("Each message needs a string 'role'.", param="messages")

    def reply(self, request: EngineRequest) -> ChatReply:
        n = request.body.get("n")
        return ChatReply(self.model.model_id, request.request_id, n if isinstance(n, int) else 1)


class _Completions(_InferenceRoute):
    """``POST /v1/completions``: the legacy completions API."""

    op: EngineOp = "completion"
    id_prefix = "cmpl"

    def reply(self, request: EngineRequest) -> CompletionReply:
        return CompletionReply(self.model.model_id, request.request_id)


class _Embeddings(_InferenceRoute):
    """``POST /v1/embeddings``: never streamed."""

    op: EngineOp = "embedding"
    id_prefix = "embd"

    def check(self, data: dict[str, Any]) -> None:
        if data.get("stream"):
            raise InvalidRequestError("Embeddings cannot be streamed.", param="stream")

    def reply(self, request: EngineRequest) -> EmbeddingReply:
        return EmbeddingReply(self.model.model_id, request.request_id)


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

    async def tokenize(request: Request) -> Response:
        try:
            data = _json_object(await request.body(), model.model_id)
            messages = data.get("messages")
            if messages is not None:
                tools = data.get("tools") or []
                if not isinstance(messages, list) or not isinstance(tools, list):
                    raise InvalidRequestError("'messages' and 'tools' must be arrays.",
                                              param="messages")
                tokens = chat_token_ids(messages, tools, data.get("add_generation_prompt", True))
            elif isinstance(data.get("prompt"), str):
                tokens = text_token_ids(data["prompt"])
            else:
                raise InvalidRequestError("Give a 'prompt' string or 'messages'.", param="prompt")
        except FlexServeError as exc:
            return Response(_vllm_error(exc), status_code=exc.status_code, media_type=_JSON)
        return Response(orjson.dumps({"count": len(tokens), "max_model_len": model.max_model_len,
                                      "tokens": tokens, "token_strs": None}), media_type=_JSON)

    async def detokenize(request: Request) -> Response:
        try:
            data = _json_object(await request.body(), model.model_id)
            ids = data.get("tokens")
            if not isinstance(ids, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise InvalidRequestError("'tokens' must be an array of token ids.", param="tokens")
        except FlexServeError as exc:
            return Response(_vllm_error(exc), status_code=exc.status_code, media_type=_JSON)
        return Response(orjson.dumps({"prompt": "".join(render_token_ids(ids))}), media_type=_JSON)

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
        Route("/v1/completions", _Completions(model), methods=["POST"]),
        Route("/v1/embeddings", _Embeddings(model), methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
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

