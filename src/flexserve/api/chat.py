"""`POST /v1/chat/completions`: the request path of the design, end to end.

auth → bounded body → validation → tier → scheduler (queue, replica,
generation) → response or SSE stream → usage record (handed to the batched
writer, never awaited on the request path).

Most of a gateway's traffic is this one route, so it is served as a bare ASGI
app ahead of Starlette's routing and middleware (``app.FlexServeApp``): the
request is read from ``receive`` and the response written with ``send``
(``api/asgi.py``), and the ``x-request-id`` header RequestIdMiddleware gives
the other routes is added here.

A stream's headers are sent only once the first token exists, so anything
that fails before generation (429 for flex, 503 for no replica, 400 from the
engine) is a plain HTTP error with the envelope. A stream that fails later
ends with an SSE ``error`` event and never with ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import anyio
import orjson
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from flexserve.accounts import Principal
from flexserve.api.asgi import (
    EVENT_STREAM,
    Headers,
    encode_headers,
    send_error,
    send_json,
    send_part,
    send_start,
)
from flexserve.api.auth import principal_of
from flexserve.api.body import receive_json
from flexserve.api.errors import error_parts
from flexserve.api.gates import Admission
from flexserve.api.request_id import new_request_id
from flexserve.api.state import Services
from flexserve.api.validation import ChatRequest, parse_chat_request
from flexserve.billing.usage import UsageRecord
from flexserve.engines.base import Delta, EngineRequest, Usage
from flexserve.errors import FlexServeError, InvalidRequestError
from flexserve.scheduler.queue import on_wait
from flexserve.scheduler.scheduler import Ticket
from flexserve.tiers import ServiceTier, resolve_tier

CHAT_PATH = "/v1/chat/completions"
FLEX_MAX_WAIT_HEADER = b"x-flex-max-wait"
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_DONE = b"data: [DONE]\n\n"


class _DisconnectWatch:
    """Cancels the handler's task when its client disconnects, so that a request
    whose client has gone leaves the queue (or stops generating) at once.

    The watch is a task waiting on ``receive`` (5-6 µs and ~1.2 KB a request),
    started only for a request that streams, or when one has to wait in the
    scheduler's queue (``queue.on_wait``). A non-streamed request admitted at
    once is not watched: if its client leaves during generation, it is
    finished, and billed, as if the client had stayed.
    """

    __slots__ = ("_handler", "_receive", "_stopped", "_task", "gone")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._handler = asyncio.current_task()
        self._receive = receive
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        if self._task is None and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._handler is not None:
            self._handler.cancel()

    def stop(self) -> None:
        """Before the response's last part: once it is sent, ``receive`` says
        "disconnect" too."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()

    def absorb(self) -> None:
        """After the cancellation it caused: let the handler clean up normally."""
        if self._handler is not None:
            self._handler.uncancel()


@dataclass(eq=False, slots=True)
class _Call:
    """What one chat call knows, for its response and its usage record."""

    request_id: str
    principal: Principal
    chat: ChatRequest
    ticket: Ticket
    arrived_at: float
    created: int
    num_deltas: int = 0
    # The latest usage an engine reported before the end (for streams cut short).
    partial_usage: Usage | None = None
    # The gates' holds (budget, rate limit), settled or released exactly once.
    admission: Admission | None = None

    @property
    def served_tier(self) -> ServiceTier:
        return self.ticket.served_tier or self.ticket.tier


class ChatCompletionsRoute:
    """The route as Starlette's router holds it, finding the services on the
    app. ``app.FlexServeApp`` answers every POST before the router is reached;
    the router gives the path's other methods their 405."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await chat_completions(scope["app"].state.services, scope, receive, send)


async def chat_completions(services: Services, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one request: an ASGI app, given the app's services."""
    settings = services.settings
    arrived_at = time.monotonic()
    request_id = new_request_id()
    # On every answer, as RequestIdMiddleware adds it on the other routes.
    reply_headers: Headers = [(b"x-request-id", request_id.encode())]
    headers = dict(scope["headers"])
    try:
        principal = await principal_of(_header(headers, b"authorization"), services.keys)
        body = await receive_json(receive, headers.get(b"content-length"), settings.max_body_bytes)
        chat = parse_chat_request(
            body,
            max_messages=settings.max_messages,
            max_completion_tokens=settings.max_completion_tokens,
        )
        max_wait = _flex_max_wait(_header(headers, FLEX_MAX_WAIT_HEADER))
        tier = resolve_tier(chat.service_tier, ServiceTier(principal.default_service_tier))
        services.scheduler.pool(chat.model)  # 404 before anything queues
        admission = await services.gate.admit(principal, chat, tier)  # 403/429 before queueing
        prompt_tokens = _estimate_prompt_tokens(chat)
        ticket = Ticket(
            request_id=request_id,
            model=chat.model,
            tier=tier,
            org_id=principal.org_id,
            prompt_tokens=prompt_tokens,
            cost_tokens=prompt_tokens + (chat.max_tokens or 256),
            stream=chat.stream,
            max_wait=max_wait,
            enqueued_at=arrived_at,
        )
        engine_request = EngineRequest(
            request_id=request_id,
            model=chat.model,
            messages=chat.messages,
            max_tokens=chat.max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            stop=chat.stop,
            seed=chat.seed,
            priority=tier.rank,
            # Flex stays streamed: the scheduler may abort it and relies on deltas.
            stream=chat.stream or tier.is_preemptible,
        )
        call = _Call(
            request_id, principal, chat, ticket, arrived_at, int(time.time()), admission=admission
        )
    except ClientDisconnect:
        return  # gone while sending its body: nobody to answer
    except Exception as exc:
        _count_refusal(services, "", exc)
        await send_error(send, exc, reply_headers)
        return
    if admission.headers:
        reply_headers += encode_headers(admission.headers)

    deltas = services.scheduler.stream(ticket, engine_request)
    watch = _DisconnectWatch(receive)
    if chat.stream:
        watch.start()
    waiting = on_wait.set(watch.start)
    first: Delta | None = None
    try:
        try:
            first = await anext(deltas)
        except Exception as exc:
            watch.stop()
            _count_refusal(services, chat.model, exc)
            await deltas.aclose()
            await send_error(send, exc, reply_headers)
            return
        if chat.stream:
            await _stream(services, call, first, deltas, watch, send, reply_headers)
        else:
            await _complete(services, call, first, deltas, watch, send, reply_headers)
    except asyncio.CancelledError:
        if not watch.gone:
            raise
        # The client has gone: nobody to answer.
        watch.absorb()
        if first is None:
            # It left while waiting: out of the queue, never run, never billed.
            await deltas.aclose()
            services.metrics.requests.labels(chat.model, tier.value, "client_gone").inc()
    finally:
        on_wait.reset(waiting)
        watch.stop()
        if first is None:  # never generated: the gates' holds go back, nothing is billed
            services.gate.release(admission)


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def _flex_max_wait(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InvalidRequestError(
            f"Invalid X-Flex-Max-Wait header: {raw!r}; expected a number of seconds >= 0.",
            param=None,
            code="invalid_header",
        )
    return value


def _estimate_prompt_tokens(chat: ChatRequest) -> int:
    # About four characters a token: enough for fair shares and wait estimates.
    return sum(len(m["content"]) for m in chat.messages) // 4 + 4 * len(chat.messages)


def _count_refusal(services: Services, model: str, exc: BaseException) -> None:
    code = (exc.code or str(exc.status_code)) if isinstance(exc, FlexServeError) else "internal_error"
    services.metrics.requests.labels(model, "", code).inc()


async def _complete(
    services: Services, call: _Call, first: Delta, deltas: AsyncGenerator[Delta, None],
    watch: _DisconnectWatch, send: Send, reply_headers: Headers,
) -> None:
    """The whole completion, answered as one JSON body."""
    parts = [first.text]
    last = first
    call.partial_usage = first.usage
    # Stays so if the client leaves mid-generation (the watch cancels this task).
    status = "client_disconnected"
    error: Exception | None = None
    try:
        if first.finish_reason is None:
            async for delta in deltas:
                parts.append(delta.text)
                last = delta
                if delta.usage is not None:
                    call.partial_usage = delta.usage
        status = "completed"
    except Exception as exc:
        status, error = "error", exc
    finally:
        watch.stop()
        call.num_deltas = sum(1 for part in parts if part)
        if status == "completed":
            # The final delta is in: the scheduler's clean-up awaits nothing, so
            # no cancellation can interrupt it and it needs no shield (~7 µs).
            await deltas.aclose()
        else:
            with anyio.CancelScope(shield=True):
                await deltas.aclose()
        _finish(services, call, last.usage, status)
    if error is not None:
        await send_error(send, error, reply_headers)
        return
    usage = last.usage or Usage(0, 0)
    body = {
        "id": "chatcmpl-" + call.request_id[4:],
        "object": "chat.completion",
        "created": call.created,
        "model": call.chat.model,
        "service_tier": call.served_tier.value,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts), "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": last.finish_reason or "stop",
            }
        ],
        "usage": _usage_dict(usage),
    }
    await send_json(send, 200, orjson.dumps(body), reply_headers)


def _usage_dict(usage: Usage) -> dict[str, object]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


class _ChunkWriter:
    """SSE chunks for one stream, with the constant part serialised once."""

    def __init__(self, call: _Call) -> None:
        head = {
            "id": "chatcmpl-" + call.request_id[4:],
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": call.chat.model,
            "service_tier": call.served_tier.value,
        }
        # Everything up to the choices, without the closing brace.
        self._head = b"data: " + orjson.dumps(head)[:-1]
        self._usage_null = b',"usage":null' if call.chat.include_usage else b""

    def delta(self, delta: dict[str, object], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._head + b',"choices":[' + orjson.dumps(choice) + b"]" + self._usage_null + b"}\n\n"

    def usage(self, usage: Usage) -> bytes:
        return self._head + b',"choices":[],"usage":' + orjson.dumps(_usage_dict(usage)) + b"}\n\n"


async def _stream(
    services: Services, call: _Call, first: Delta, deltas: AsyncGenerator[Delta, None],
    watch: _DisconnectWatch, send: Send, reply_headers: Headers,
) -> None:
    """Server-sent events: a chunk per delta as it comes; the role chunk goes
    out with the first text, and the end in one piece."""
    writer = _ChunkWriter(call)
    status = "client_disconnected"
    usage: Usage | None = None
    await send_start(send, 200, EVENT_STREAM, [*_SSE_HEADERS, *reply_headers])
    pending = writer.delta({"role": "assistant", "content": "", "refusal": None})
    try:
        last = first
        call.partial_usage = first.usage
        if first.text:
            call.num_deltas += 1
            pending += writer.delta({"content": first.text})
        if first.finish_reason is None:
            await send_part(send, pending)
            pending = b""
            async for delta in deltas:
                last = delta
                if delta.usage is not None:
                    call.partial_usage = delta.usage
                if delta.text:
                    call.num_deltas += 1
                    await send_part(send, writer.delta({"content": delta.text}))
                if delta.finish_reason is not None:
                    break
        usage = last.usage if last.finish_reason is not None else None
        pending += writer.delta({}, last.finish_reason or "stop")
        if call.chat.include_usage:
            pending += writer.usage(usage or Usage(0, 0))
        pending += _DONE
        status = "completed"
    except Exception as exc:
        status = "error"
        pending += b"event: error\ndata: " + error_parts(exc)[1] + b"\n\n"
    finally:
        watch.stop()
        if status == "completed":
            await deltas.aclose()  # as in _complete: nothing left to shield
        else:
            with anyio.CancelScope(shield=True):
                await deltas.aclose()
        _finish(services, call, usage, status)
    await send_part(send, pending, last=True)


def _finish(services: Services, call: _Call, usage: Usage | None, status: str) -> None:
    """Metrics and the usage record for a request that reached an engine."""
    now = time.monotonic()
    if usage is None:
        # Ended early (client gone, engine failed): what the engine last said it
        # had done, or, from engines that only report at the end, the tokens
        # streamed so far (prompt unknown: not billed).
        usage = call.partial_usage or Usage(0, call.num_deltas)
    tier = call.served_tier.value
    model = call.chat.model
    total_time = now - call.arrived_at
    queue_time = call.ticket.queue_time
    metrics = services.metrics
    metrics.requests.labels(model, tier, status).inc()
    metrics.tokens.labels(model, tier, "prompt").inc(usage.prompt_tokens)
    metrics.tokens.labels(model, tier, "completion").inc(usage.completion_tokens)
    metrics.latency.labels(tier).observe(total_time)
    metrics.queue_time.labels(tier).observe(queue_time)
    first_token_at = call.ticket.first_token_at
    ttft = None if first_token_at is None else first_token_at - call.arrived_at
    if ttft is not None:
        metrics.ttft.labels(tier).observe(ttft)
    record = UsageRecord(
        request_id=call.request_id,
        org_id=call.principal.org_id,
        project_id=call.principal.project_id,
        api_key_id=call.principal.key_id,
        model=model,
        requested_tier=call.chat.service_tier or "auto",
        served_tier=tier,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        queue_time=queue_time,
        ttft=ttft,
        total_time=total_time,
        status=status,
        created_at=call.created,
    )
    # Costed at the served tier's price; the budget hold swapped for the cost.
    services.gate.settle(call.admission, record)
    services.usage.submit(record)
