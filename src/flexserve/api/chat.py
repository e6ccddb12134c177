"""`POST /v1/chat/completions`: the request path of the design, end to end.

auth → bounded body → validation → tier → scheduler (queue, replica,
generation) → response or SSE stream → usage record (handed to the batched
writer, never awaited on the request path).

A stream's headers are sent only once the first token exists, so anything
that fails before generation (429 for flex, 503 for no replica, 400 from the
engine) is a plain HTTP error with the envelope. A stream that fails later
ends with an SSE ``error`` event and never with ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from flexserve.accounts import Principal
from flexserve.api.auth import authenticate
from flexserve.api.body import read_json
from flexserve.api.errors import error_response
from flexserve.api.gates import Admission
from flexserve.api.state import Services
from flexserve.api.validation import ChatRequest, parse_chat_request
from flexserve.billing.usage import UsageRecord
from flexserve.engines.base import Delta, EngineRequest, Usage
from flexserve.errors import FlexServeError, InvalidRequestError
from flexserve.scheduler.scheduler import Ticket
from flexserve.tiers import ServiceTier, resolve_tier

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FLEX_MAX_WAIT_HEADER = "x-flex-max-wait"


class _DisconnectWatch:
    """Cancels the handler's task when its client disconnects, so that a request
    whose client has gone leaves the queue (or stops generating) at once."""

    def __init__(self, request: Request) -> None:
        self.gone = False
        self._handler = asyncio.current_task()
        self._task = asyncio.ensure_future(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                if self._handler is not None:
                    self._handler.cancel()
                return

    def stop(self) -> None:
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


async def chat_completions(request: Request) -> Response:
    services: Services = request.app.state.services
    settings = services.settings
    arrived_at = time.monotonic()
    # Set by RequestIdMiddleware; read from the scope (request.state builds a State).
    request_id: str = request.scope["state"]["request_id"]
    try:
        principal = await authenticate(request, services.keys)
        body = await read_json(request, settings.max_body_bytes)
        chat = parse_chat_request(
            body,
            max_messages=settings.max_messages,
            max_completion_tokens=settings.max_completion_tokens,
        )
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
            max_wait=_flex_max_wait(request),
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
    except FlexServeError as exc:
        _count_refusal(services, "", exc)
        return error_response(exc)

    deltas = services.scheduler.stream(ticket, engine_request)
    watch = _DisconnectWatch(request)
    first: Delta | None = None
    try:
        first = await anext(deltas)
        if not chat.stream:
            return await _complete(services, call, first, deltas)
    except FlexServeError as exc:
        _count_refusal(services, chat.model, exc)
        await deltas.aclose()
        return error_response(exc)
    except asyncio.CancelledError:
        if not watch.gone:
            raise
        # The client left while waiting: out of the queue, never run, never billed.
        watch.absorb()
        await deltas.aclose()
        if first is None:  # otherwise _complete has metered the tokens generated
            services.metrics.requests.labels(chat.model, tier.value, "client_gone").inc()
        return Response(status_code=499)
    finally:
        watch.stop()
        if first is None:  # never generated: the gates' holds go back, nothing is billed
            services.gate.release(admission)
    return StreamingResponse(
        _sse(services, call, first, deltas),
        media_type="text/event-stream",
        headers={**_SSE_HEADERS, **admission.headers},
    )


def _flex_max_wait(request: Request) -> float | None:
    raw = request.headers.get(FLEX_MAX_WAIT_HEADER)
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


def _count_refusal(services: Services, model: str, exc: FlexServeError) -> None:
    services.metrics.requests.labels(model, "", exc.code or str(exc.status_code)).inc()


async def _complete(
    services: Services, call: _Call, first: Delta, deltas: AsyncGenerator[Delta, None]
) -> Response:
    parts = [first.text]
    last = first
    call.partial_usage = first.usage
    # Stays so if the client leaves mid-generation (the watch cancels this task).
    status = "client_disconnected"
    try:
        if first.finish_reason is None:
            async for delta in deltas:
                parts.append(delta.text)
                last = delta
                if delta.usage is not None:
                    call.partial_usage = delta.usage
        status = "completed"
    except FlexServeError as exc:
        status = "error"
        return error_response(exc)
    finally:
        call.num_deltas = sum(1 for part in parts if part)
        if status == "completed":
            # The final delta is in: the scheduler's clean-up awaits nothing, so
            # no cancellation can interrupt it and it needs no shield (~7 µs).
            await deltas.aclose()
        else:
            with anyio.CancelScope(shield=True):
                await deltas.aclose()
        _finish(services, call, last.usage, status)
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
    headers = call.admission.headers if call.admission is not None else None
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


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


async def _sse(
    services: Services, call: _Call, first: Delta, deltas: AsyncGenerator[Delta, None]
) -> AsyncIterator[bytes]:
    writer = _ChunkWriter(call)
    status = "client_disconnected"
    usage: Usage | None = None
    try:
        yield writer.delta({"role": "assistant", "content": "", "refusal": None})
        last = first
        call.partial_usage = first.usage
        if first.text:
            call.num_deltas += 1
            yield writer.delta({"content": first.text})
        if first.finish_reason is None:
            async for delta in deltas:
                last = delta
                if delta.usage is not None:
                    call.partial_usage = delta.usage
                if delta.text:
                    call.num_deltas += 1
                    yield writer.delta({"content": delta.text})
                if delta.finish_reason is not None:
                    break
        usage = last.usage if last.finish_reason is not None else None
        yield writer.delta({}, last.finish_reason or "stop")
        if call.chat.include_usage:
            yield writer.usage(usage or Usage(0, 0))
        yield b"data: [DONE]\n\n"
        status = "completed"
    except FlexServeError as exc:
        status = "error"
        yield b"event: error\ndata: " + orjson.dumps(exc.to_dict()) + b"\n\n"
    finally:
        with anyio.CancelScope(shield=True):
            await deltas.aclose()
        _finish(services, call, usage, status)


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
