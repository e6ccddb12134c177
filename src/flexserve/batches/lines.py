"""One batch line through the request pipeline's pieces, on the `batch` tier.

The same parse, model and feature checks, gates, scheduler and usage record
as a live request (``api/pipeline.py``), without HTTP: the line is queued on
the `batch` tier, below flex, so it runs only on spare capacity. A line is
billed once, at the batch price, from its own usage, under a request id
derived from the batch and the line number: if a killed gateway runs the
line again, the ledger keeps the first record of that id only.

What comes back is the line's result: an output line, an error line for a
4xx (never retried), or a ``Retry`` for an engine's 429/5xx and for no
capacity, which the runner tries again after a pause.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio

from flexserve.accounts import Principal
from flexserve.api.inference import Call, Endpoint, check_features
from flexserve.api.pipeline import _OUTPUT_GUESS, _finish
from flexserve.api.state import Services
from flexserve.batches.store import LineResult, PendingLine
from flexserve.billing.budget import Reservation
from flexserve.engines.base import Delta, Usage
from flexserve.errors import (
    FlexServeError,
    InsufficientQuotaError,
    RateLimitError,
    ResourceUnavailableError,
)
from flexserve.scheduler.scheduler import Ticket
from flexserve.tiers import ServiceTier


class Retry(Exception):
    """The line could not be served now; ``counts``: an attempt used up (an
    engine failure), not a wait for capacity or a rate limit."""

    def __init__(self, error: FlexServeError, *, counts: bool, after: float) -> None:
        super().__init__(error.message)
        self.error = error
        self.counts = counts
        self.after = after


def error_result(line: PendingLine, exc: FlexServeError) -> LineResult:
    """An error-file line answered with the status and body the endpoint would have sent."""
    return LineResult(line.line, "failed", status_code=exc.status_code, response=exc.to_dict())


async def run_line(
    services: Services, endpoint: Endpoint, principal: Principal, line: PendingLine,
    record: Callable[[LineResult], None], *, hold: Reservation | None = None,
    window: str | None = None,
) -> None:
    """Serve one line; ``record`` gets its result (before any later await, so a
    line billed is a line recorded even if the batch is cancelled just after).
    Raises ``Retry`` when it should be tried again. ``hold``: the batch's
    budget hold, which the line's own reservation is taken out of;
    ``window``: its completion window, which prices it."""
    arrived_at = time.monotonic()
    try:
        inference = endpoint.parse(line.body, line.request_id, services.settings)
        # The usage record's requested tier: what the batch asked for.
        inference.service_tier = ServiceTier.BATCH.value
        inference.stream = False
        model = inference.model
        pool = services.scheduler.pool(model)
        check_features(inference, pool.features, model)
        await endpoint.prepare(services, principal, inference)
        services.usage.check_room()
        admission = await services.gate.admit(principal, inference, ServiceTier.BATCH, hold=hold,
                                              window=window)
    except FlexServeError as exc:
        _raise_if_retryable(exc)
        record(error_result(line, exc))
        return
    ticket = Ticket(
        request_id=line.request_id,
        model=model,
        tier=ServiceTier.BATCH,
        org_id=principal.org_id,
        prompt_tokens=inference.prompt_tokens,
        cost_tokens=inference.prompt_tokens + inference.output_tokens_guess(_OUTPUT_GUESS),
        stream=False,
        enqueued_at=arrived_at,
        # Refused, the line keeps its place in the queue for its retry.
        fingerprint=line.request_id.encode(),
    )
    # Preemptible work stays streamed from the engine: the scheduler may abort it.
    inference.engine.stream = True
    call = Call(line.request_id, principal, inference, ticket, arrived_at, int(time.time()),
                admission=admission)
    output = endpoint.output(call)
    deltas = services.scheduler.stream(ticket, inference.engine)
    completed = False
    last: Delta | None = None
    try:
        async for delta in deltas:
            output.collect(delta)
            last = delta
            if delta.has_output:
                call.num_deltas += 1
            if delta.usage is not None:
                call.partial_usage = delta.usage
        completed = True
    except FlexServeError as exc:
        _raise_if_retryable(exc)
        record(error_result(line, exc))
        return
    finally:
        with anyio.CancelScope(shield=True):
            await deltas.aclose()
        if not completed:
            # Not finished (failed, cancelled, shutting down): nothing billed;
            # it is run again or gets its error line.
            services.gate.release(admission)
    usage = (last.usage if last is not None else None) or call.partial_usage or Usage(0, call.num_deltas)
    billed = _finish(services, call, usage, "completed")
    document: dict[str, Any] = output.document(usage)
    # OpenAI's response schemas have no `batch` service tier, and its own batch
    # output bodies carry none: the tier is the batch's, and billed as such.
    document.pop("service_tier", None)
    record(LineResult(
        line.line, "done", status_code=200, response=document,
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        cached_tokens=min(usage.cached_tokens, usage.prompt_tokens),
        cost_pico=billed.costs.total,
    ))
    if endpoint.has_finish_step:
        await endpoint.finished(services, call, output)


def _raise_if_retryable(exc: FlexServeError) -> None:
    """A 4xx is the line's answer; 429 (but a spent budget) and 5xx are tried again."""
    if isinstance(exc, (ResourceUnavailableError, RateLimitError)):
        after = float(exc.headers.get("Retry-After", "1"))
        raise Retry(exc, counts=False, after=after) from exc
    if exc.status_code >= 500:
        raise Retry(exc, counts=True, after=0.0) from exc
    if exc.status_code == 429 and not isinstance(exc, InsufficientQuotaError):
        raise Retry(exc, counts=True, after=0.0) from exc
