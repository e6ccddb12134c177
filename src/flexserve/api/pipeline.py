"""The request path of the design, once for every inference endpoint.

auth → bounded body → validation (the endpoint's) → tier → model and the
features it needs → the endpoint's own preparation → gates → scheduler
(queue, replica, generation) → the endpoint's answer, whole or streamed →
usage record (journaled, then handed to the batched writer, never awaited
on the request path; ``_finish`` runs before the response's last bytes are
sent, so a response its client received is in the journal even if the
process is killed right after).

Inference routes are bare ASGI apps ahead of Starlette's routing and
middleware (``app.FlexServeApp``): the request is read from ``receive`` and
the response written with ``send`` (``api/asgi.py``), and the
``x-request-id`` header RequestIdMiddleware gives the other routes is added
here.

A stream's headers are sent only once the first delta exists, so anything
that fails before generation (429 for flex, 503 for no replica, 400 from the
engine) is a plain HTTP error with the envelope. A stream that fails later
ends with the endpoint's error event.

However a request ends, its gates' holds are settled (it reached an engine:
billed at the served tier's price for what it used) or released (it never
did: nothing billed), exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncGenerator

import anyio
import orjson
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from flexserve.accounts.service import Principal
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
from flexserve.api.drain import shutting_down
from flexserve.api.inference import Call, Endpoint, Output, check_features
from flexserve.api.request_id import new_request_id
from flexserve.observability.logs import request_id_var
from flexserve.observability.requests import log_refused, log_request
from flexserve.observability.tracing import (
    current_span,
    finish_request,
    name_request,
    operation_of,
    refuse_request,
)
from flexserve.api.state import Services
from flexserve.billing.usage import UsageRecord
from flexserve.engines.base import Delta, Usage
from flexserve.errors import FlexServeError, InvalidRequestError
from flexserve.scheduler.flex_waits import place_key
from flexserve.scheduler.queue import on_wait
from flexserve.scheduler.scheduler import Ticket
from flexserve.tiers import ServiceTier, resolve_tier

FLEX_MAX_WAIT_HEADER = b"x-flex-max-wait"
# On a flex request: the place a status read reported (``scheduler/holds.py``).
FLEX_PLACE_HEADER = b"x-flex-place"
_MAX_PLACE_LENGTH = 64
# On a flex response or refusal: the wait (p50, seconds) estimated for it on arrival.
FLEX_ESTIMATED_WAIT_HEADER = b"x-flex-estimated-wait"
# The official SDKs say how long they will wait for an answer (their read
# timeout, seconds; Python sends the first, other Stainless SDKs the second):
# a flex request is refused before that rather than left to time out and be
# sent again.
CLIENT_TIMEOUT_HEADERS = (b"x-stainless-read-timeout", b"x-stainless-timeout")
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
# Output tokens assumed for a request's expected cost when it sets no limit.
_OUTPUT_GUESS = 256


class DisconnectWatch:
    """Cancels the handler's task when its client disconnects, so that a request
    whose client has gone leaves the queue (or stops generating) at once.

    The watch is a task waiting on ``receive``, started only for a request
    that streams, or when one has to wait in the scheduler's queue
    (``queue.on_wait``). A non-streamed request admitted at once is not
    watched: if its client leaves during generation, it is finished, and
    billed, as if the client had stayed (as OpenAI's API does).
    """

    __slots__ = ("_handler", "_receive", "_stopped", "_task", "gone", "server_ended")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        # Set when the server, shutting down, ended the request (api/drain.py).
        self.server_ended = False
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

    def end(self) -> None:
        """The server is shutting down and the request's time is up: cancel
        the handler, unless its response's last part is already under way."""
        if not self._stopped and not self.server_ended and self._handler is not None:
            self.server_ended = True
            self._handler.cancel()

    def absorb(self) -> None:
        """After the cancellation it caused: let the handler clean up normally."""
        if self._handler is not None:
            self._handler.uncancel()


class InferenceRoute:
    """An endpoint as Starlette's router holds it, finding the services on the
    app. ``app.FlexServeApp`` answers every POST before the router is reached;
    the router gives the path's other methods their 405."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve(self.endpoint, scope["app"].state.services, scope, receive, send)


async def serve(endpoint: Endpoint, services: Services, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one inference request: an ASGI app, given the endpoint and the app's services."""
    arrived_at = time.monotonic()
    request_id = new_request_id()
    # Every log line written while serving it carries its id (this task's
    # context, and the tasks and timers it starts).
    request_id_var.set(request_id)
    if not services.tracing.enabled:
        await _serve(endpoint, services, scope, receive, send, request_id, arrived_at)
        return
    # Its span is current throughout: upstream calls carry its traceparent.
    with services.tracing.request(operation_of(endpoint.path), arrived_at, request_id):
        await _serve(endpoint, services, scope, receive, send, request_id, arrived_at)


async def _serve(endpoint: Endpoint, services: Services, scope: Scope, receive: Receive, send: Send,
                 request_id: str, arrived_at: float) -> None:
    settings = services.settings
    # On every answer, as RequestIdMiddleware adds it on the other routes.
    reply_headers: Headers = [(b"x-request-id", request_id.encode())]
    headers = dict(scope["headers"])
    model = ""
    principal: Principal | None = None
    tier: ServiceTier | None = None
    if services.drain.draining:
        await send_error(send, shutting_down(), reply_headers)
        return
    try:
        principal = await principal_of(_header(headers, b"authorization"), services.keys)
        body, raw = await receive_json(receive, headers.get(b"content-length"), settings.max_body_bytes)
        inference = endpoint.parse(body, request_id, settings)
        model = inference.model
        max_wait = _flex_max_wait(_header(headers, FLEX_MAX_WAIT_HEADER), _client_timeout(headers))
        tier = resolve_tier(inference.service_tier, ServiceTier(principal.default_service_tier))
        pool = services.scheduler.pool(model)  # 404 before anything queues
        check_features(inference, pool.features, model)
        await endpoint.prepare(services, principal, inference)
        services.usage.check_room()  # 503 while usage could not be recorded safely
        # Priority past its share is served as default: decided before the gates,
        # so that it is rate-limited and budgeted as the tier it is served on.
        served_tier = services.scheduler.tier_to_serve(pool, tier)
        admission = await services.gate.admit(principal, inference, served_tier)  # 403/429 before queueing
        ticket = Ticket(
            request_id=request_id,
            model=model,
            tier=tier,
            served_tier=served_tier,
            org_id=principal.org_id,
            prompt_tokens=inference.prompt_tokens,
            cost_tokens=inference.prompt_tokens + inference.output_tokens_guess(_OUTPUT_GUESS),
            stream=inference.stream,
            max_wait=max_wait,
            enqueued_at=arrived_at,
            # A refused flex request's place is held under it for its retry.
            fingerprint=hashlib.blake2b(raw, digest_size=16).digest() if tier.is_preemptible else None,
            place=_flex_place(_header(headers, FLEX_PLACE_HEADER)) if tier.is_preemptible else None,
        )
        # Flex stays streamed: the scheduler may abort it and relies on deltas.
        inference.engine.stream = inference.stream or tier.is_preemptible
        inference.engine.read_whole = not inference.stream
        if tier.is_preemptible:
            services.metrics.flex_wait_limit.observe(services.scheduler.flex_deadline(ticket))
        call = Call(request_id, principal, inference, ticket, arrived_at, int(time.time()), admission=admission,
                    gated_at=time.monotonic())
        if services.tracing.enabled:
            span = current_span()
            name_request(span, operation_of(endpoint.path), model, inference.engine.max_tokens,
                         principal.org_id, principal.project_id)
            services.tracing.child(span, "gates", arrived_at, call.gated_at)
    except ClientDisconnect:
        return  # gone while sending its body: nobody to answer
    except Exception as exc:
        _refused(services, request_id, model, exc, principal, tier)
        await send_error(send, exc, reply_headers)
        return
    if admission.headers:
        reply_headers += encode_headers(admission.headers)

    deltas = services.scheduler.stream(ticket, inference.engine)
    watch = DisconnectWatch(receive)
    if inference.stream:
        watch.start()
    services.drain.add(watch)
    waiting = on_wait.set(watch.start)
    first: Delta | None = None
    try:
        try:
            first = await anext(deltas)
        except Exception as exc:
            watch.stop()
            _refused(services, request_id, model, exc, principal, tier)
            await deltas.aclose()
            await send_error(send, exc, _with_estimate(reply_headers, ticket))
            return
        reply_headers = _with_estimate(reply_headers, ticket)
        output = endpoint.output(call)
        if inference.stream:
            await _stream(services, endpoint, call, output, first, deltas, watch, send, reply_headers)
        else:
            await _complete(services, endpoint, call, output, first, deltas, watch, send, reply_headers)
    except asyncio.CancelledError:
        if watch.server_ended and not watch.gone and first is None:
            # Shutting down before any answer (queued, or the engine not done):
            # 503, and nothing billed.
            watch.absorb()
            with anyio.CancelScope(shield=True):
                await deltas.aclose()
            await send_error(send, shutting_down(), reply_headers)
            return
        if not watch.gone:
            raise
        # The client has gone: nobody to answer.
        watch.absorb()
        if first is None:
            # It left while waiting: out of the queue, never run, never billed.
            await deltas.aclose()
            services.metrics.requests.labels(model, tier.value, "client_gone").inc()
    finally:
        on_wait.reset(waiting)
        watch.stop()
        services.drain.discard(watch)
        if first is None:  # never generated: the gates' holds go back, nothing is billed
            services.gate.release(admission)


def _with_estimate(reply_headers: Headers, ticket: Ticket) -> Headers:
    """``reply_headers`` with the flex wait estimated on arrival, when there is one."""
    estimate = ticket.estimated_wait
    if estimate is None:
        return reply_headers
    return [*reply_headers, (FLEX_ESTIMATED_WAIT_HEADER, format_seconds(estimate.p50).encode())]


def format_seconds(seconds: float) -> str:
    """Seconds to three significant digits, without an exponent: 0.0123,
    4.56, 1230, 0.0000421 ("0" below a nanosecond: a wait told as 0 is none)."""
    if seconds < 1e-9:
        return "0"
    text = f"{seconds:.3g}"
    if "e" not in text:
        return text
    value = float(text)
    return str(round(value)) if value >= 1 else f"{value:.12f}".rstrip("0")


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def _client_timeout(headers: dict[bytes, bytes]) -> str | None:
    for name in CLIENT_TIMEOUT_HEADERS:
        value = headers.get(name)
        if value is not None:
            return value.decode("latin-1")
    return None


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) and value >= 0 else math.nan


def _flex_place(raw: str | None) -> bytes | None:
    """The place named in ``X-Flex-Place``, as the scheduler keys it; one
    that was never held, or has lapsed, is simply not found."""
    return None if raw is None else place_key(check_place(raw, None))


def check_place(raw: str, param: str | None) -> str:
    """A place's name as ``/v1/flex/status`` or a 429 gave it (in the
    ``param`` query parameter, or the ``X-Flex-Place`` header): 400 if it
    cannot be one."""
    if not raw or len(raw) > _MAX_PLACE_LENGTH or not raw.isascii() or not raw.isprintable():
        where = f"`{param}`" if param else "X-Flex-Place header"
        raise InvalidRequestError(
            f"Invalid {where}: expected the `place` a read of /v1/flex/status or a 429 "
            f"reported (at most {_MAX_PLACE_LENGTH} printable characters).",
            param=param,
            code="invalid_value" if param else "invalid_header",
        )
    return raw


def _flex_max_wait(raw: str | None, client_timeout: str | None) -> float | None:
    """The client's own limit on a flex wait: ``X-Flex-Max-Wait``, and no
    longer than the SDK's timeout allows (``flex_wait_for_timeout``)."""
    limit: float | None = None
    if raw is not None:
        limit = _seconds(raw)
        if math.isnan(limit):
            raise InvalidRequestError(
                f"Invalid X-Flex-Max-Wait header: {raw!r}; expected a number of seconds >= 0.",
                param=None,
                code="invalid_header",
            )
    if client_timeout is not None:
        timeout = _seconds(client_timeout)
        if not math.isnan(timeout) and timeout > 0:
            cap = flex_wait_for_timeout(timeout)
            limit = cap if limit is None else min(limit, cap)
    return limit


def flex_wait_for_timeout(timeout: float) -> float:
    """The longest flex wait a client with this read timeout can take: a tenth
    of it (at least 10 s, at most 60 s) is kept for the generation and the
    answer, so that a request that cannot start in time is refused with 429
    while its client still listens, instead of timing out and being sent again."""
    return max(0.0, timeout - min(60.0, max(10.0, timeout / 10)))


def _refused(services: Services, request_id: str, model: str, exc: BaseException,
             principal: Principal | None, tier: ServiceTier | None) -> None:
    """A request refused before any engine ran it: counted in
    ``flexserve_requests`` (its model only if the gateway serves it: a
    client's made-up names would each add a series; its tier ``none``; its
    status the error's code), logged, and said on its span."""
    code = (exc.code or str(exc.status_code)) if isinstance(exc, FlexServeError) else "internal_error"
    label = model if model in services.scheduler.pools else "unknown"
    services.metrics.requests.labels(label, "none", code).inc()
    log_refused(request_id, model, exc, principal, None if tier is None else tier.value)
    if services.history is not None:
        services.history.observe_refused(
            None if principal is None else principal.org_id, None if tier is None else tier.value,
            exc.status_code if isinstance(exc, FlexServeError) else 500, code,
        )
    if services.tracing.enabled:
        refuse_request(current_span(), exc.status_code if isinstance(exc, FlexServeError) else 500, code)


async def _complete(
    services: Services, endpoint: Endpoint, call: Call, output: Output, first: Delta,
    deltas: AsyncGenerator[Delta, None], watch: DisconnectWatch, send: Send, reply_headers: Headers,
) -> None:
    """The whole answer, as one JSON document."""
    output.collect(first)
    last = first
    num_deltas = 1 if first.has_output else 0
    call.partial_usage = first.usage
    # Stays so if the client leaves mid-generation (the watch cancels this task).
    status = "client_disconnected"
    error: Exception | None = None
    try:
        async for delta in deltas:
            output.collect(delta)
            last = delta
            if delta.has_output:
                num_deltas += 1
            if delta.usage is not None:
                call.partial_usage = delta.usage
        status = "completed"
    except asyncio.CancelledError:
        if not watch.server_ended or watch.gone:
            raise
        # Shutting down: the client gets no answer, so no charge (api/drain.py).
        watch.absorb()
        status, error = "aborted", shutting_down()
    except Exception as exc:
        status, error = "error", exc
    finally:
        watch.stop()
        call.num_deltas = num_deltas
        if status == "completed":
            # The generation is over: the scheduler's clean-up awaits nothing,
            # so no cancellation can interrupt it and it needs no shield.
            await deltas.aclose()
        else:
            with anyio.CancelScope(shield=True):
                await deltas.aclose()
        usage = last.usage if status == "completed" else None
        _finish(services, call, usage, status)
    if error is not None:
        await send_error(send, error, reply_headers)
        return
    document = output.document(usage or _estimated_usage(call))
    if endpoint.has_finish_step:
        await endpoint.finished(services, call, output)
    await send_json(send, 200, orjson.dumps(document), reply_headers)


async def _stream(
    services: Services, endpoint: Endpoint, call: Call, output: Output, first: Delta,
    deltas: AsyncGenerator[Delta, None], watch: DisconnectWatch, send: Send, reply_headers: Headers,
) -> None:
    """Server-sent events: the opening events go out with the first delta's,
    then one write per delta, and the end in one piece."""
    status = "client_disconnected"
    usage: Usage | None = None
    await send_start(send, 200, EVENT_STREAM, [*_SSE_HEADERS, *reply_headers])
    pending = output.open()
    try:
        last = first
        call.partial_usage = first.usage
        if first.has_output:
            call.num_deltas += 1
        pending += output.event(first)
        if first.finish_reason is None:
            # More is coming: the first token goes out now. (An engine that
            # answers at once ends in this delta: everything goes in one write.)
            await send_part(send, pending)
            pending = b""
        async for delta in deltas:
            last = delta
            if delta.usage is not None:
                call.partial_usage = delta.usage
            if delta.has_output:
                call.num_deltas += 1
            event = output.event(delta)
            if event:
                if pending:
                    event, pending = pending + event, b""
                await send_part(send, event)
        usage = last.usage or _estimated_usage(call)
        pending += output.close(usage)
        status = "completed"
    except asyncio.CancelledError:
        if not watch.server_ended or watch.gone:
            raise
        # Shutting down: billed for what it delivered, ended with an error event.
        watch.absorb()
        status = "server_shutdown"
        pending += output.failed(shutting_down())
    except Exception as exc:
        status = "error"
        pending += output.failed(exc)
    finally:
        watch.stop()
        if status == "completed":
            await deltas.aclose()  # as in _complete: nothing left to shield
        else:
            with anyio.CancelScope(shield=True):
                await deltas.aclose()
        _finish(services, call, usage, status)
    if status == "completed" and endpoint.has_finish_step:
        with anyio.CancelScope(shield=True):
            await endpoint.finished(services, call, output)
    await send_part(send, pending, last=True)


def _estimated_usage(call: Call) -> Usage:
    """From engines that report no usage: one token per delta with output
    (prompt unknown: not billed)."""
    return call.partial_usage or Usage(0, call.num_deltas)


def _finish(services: Services, call: Call, usage: Usage | None, status: str) -> UsageRecord:
    """Metrics and the usage record for a request that reached an engine; the
    record, costed."""
    now = time.monotonic()
    if usage is None:
        # Ended early (client gone, engine failed): what the engine last said it
        # had done, or, from engines that only report at the end, the deltas
        # streamed so far.
        usage = _estimated_usage(call)
    tier = call.served_tier.value
    model = call.model
    total_time = now - call.arrived_at
    queue_time = call.ticket.queue_time
    metrics = services.metrics
    metrics.requests.labels(model, tier, status).inc()
    metrics.tokens.labels(model, tier, "prompt").inc(usage.prompt_tokens)
    metrics.tokens.labels(model, tier, "completion").inc(usage.completion_tokens)
    metrics.latency.labels(tier).observe(total_time)
    metrics.queue_time.labels(tier).observe(queue_time)
    estimate = call.ticket.estimated_wait
    if estimate is not None:
        metrics.observe_flex_wait(model, estimate.p50, queue_time)
    first_token_at = call.ticket.first_token_at
    ttft = None if first_token_at is None else first_token_at - call.arrived_at
    if ttft is not None:
        metrics.ttft.labels(tier).observe(ttft)
    if services.history is not None:
        tpot = None
        if first_token_at is not None and usage.completion_tokens > 1:
            tpot = (now - first_token_at) / (usage.completion_tokens - 1)
        services.history.observe(call.principal.org_id, tier, queue_time, ttft, tpot)
    record = UsageRecord(
        request_id=call.request_id,
        org_id=call.principal.org_id,
        project_id=call.principal.project_id,
        api_key_id=call.principal.key_id,
        model=model,
        requested_tier=call.inference.service_tier or "auto",
        served_tier=tier,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=min(usage.cached_tokens, usage.prompt_tokens),
        queue_time=queue_time,
        ttft=ttft,
        total_time=total_time,
        status=status,
        created_at=call.created,
    )
    # Costed at the served tier's price; the budget hold swapped for the cost.
    services.gate.settle(call.admission, record)
    services.usage.submit(record)
    log_request(record, call.ticket.replica_name)
    if services.tracing.enabled:
        span = current_span()
        started_at = call.arrived_at + queue_time
        services.tracing.child(span, "queue", call.gated_at or call.arrived_at, started_at,
                               **{"flexserve.tier.served": tier})
        services.tracing.child(span, "engine", started_at, now, **{"gen_ai.request.model": model})
        services.tracing.child(span, "metering", now, time.monotonic())
        finish_request(span, record)
    return record
