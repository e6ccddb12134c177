"""OpenTelemetry traces, off unless ``otlp_endpoint`` is set (and the
``otel`` extra installed: ``pip install 'flexserve[otel]'``).

One span per inference request, named as OpenTelemetry's GenAI semantic
conventions name a model call (``chat llama3-8b``), with their attributes
(``gen_ai.operation.name``, ``gen_ai.request.model``,
``gen_ai.request.max_tokens``, ``gen_ai.usage.input_tokens`` and
``gen_ai.usage.output_tokens``) and FlexServe's (``flexserve.request_id``,
organization and project ids, requested and served tier, status, cost).
Its children, timed from what the request recorded:

- ``gates``: authentication, validation and the budget and rate gates;
- ``queue``: waiting for a replica (for flex, the wait it was sold);
- ``engine``: from the replica's grant to the last token;
- ``metering``: the usage record, costed and journaled.

While the request's span is current, calls to upstream engines carry its
``traceparent`` (W3C trace context; vLLM continues such traces), so an
engine's spans join the gateway's trace.

Spans go out in batches over OTLP/HTTP (``{otlp_endpoint}/v1/traces``), in a
background thread: a request never waits for the exporter.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flexserve.billing.usage import UsageRecord

log = logging.getLogger(__name__)

# Wall-clock nanoseconds minus monotonic seconds: spans are stamped in
# wall-clock time, the request path measures in monotonic time.
_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def wall_ns(monotonic_seconds: float) -> int:
    return _WALL_OFFSET_NS + int(monotonic_seconds * 1e9)


class Tracing:
    """The gateway's tracer, or nothing (every method then does nothing)."""

    def __init__(self, endpoint: str = "", service_name: str = "flexserve") -> None:
        self._tracer: Any = None
        self._provider: Any = None
        if not endpoint:
            return
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise RuntimeError(
                "otlp_endpoint is set but OpenTelemetry is not installed: pip install 'flexserve[otel]'"
            ) from exc
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces"), schedule_delay_millis=500))
        self._provider = provider
        self._tracer = provider.get_tracer("flexserve")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @contextlib.contextmanager
    def request(self, operation: str, start_monotonic: float, request_id: str) -> Iterator[Any]:
        """The request's span, current while the block runs (None when off)."""
        if self._tracer is None:
            yield None
            return
        from opentelemetry import trace

        span = self._tracer.start_span(
            operation, kind=trace.SpanKind.SERVER, start_time=wall_ns(start_monotonic),
            attributes={"gen_ai.operation.name": operation, "flexserve.request_id": request_id},
        )
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            yield span

    def child(self, parent: Any, name: str, start_monotonic: float, end_monotonic: float,
              **attributes: Any) -> None:
        """A finished child span of ``parent``, from its recorded times."""
        if self._tracer is None or parent is None:
            return
        from opentelemetry import trace

        context = trace.set_span_in_context(parent)
        span = self._tracer.start_span(name, context=context, start_time=wall_ns(start_monotonic),
                                       attributes={k: v for k, v in attributes.items() if v is not None})
        span.end(end_time=wall_ns(max(start_monotonic, end_monotonic)))

    def close(self) -> None:
        """Send what is left and stop the exporter."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None
            self._tracer = None


# The GenAI semantic conventions' operation of each inference path.
_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/responses": "chat",
               "/v1/completions": "text_completion", "/v1/embeddings": "embeddings"}


def operation_of(path: str) -> str:
    return _OPERATIONS.get(path, "chat")


def current_span() -> Any:
    """The span current in this context (call only while tracing is on)."""
    from opentelemetry import trace

    return trace.get_current_span()


def name_request(span: Any, operation: str, model: str, max_tokens: int | None,
                 principal_org: str, principal_project: str) -> None:
    """What a request's span says once the request is read."""
    if span is None:
        return
    span.update_name(f"{operation} {model}")
    span.set_attributes({
        "gen_ai.request.model": model,
        "flexserve.org_id": principal_org,
        "flexserve.project_id": principal_project,
    })
    if max_tokens is not None:
        span.set_attribute("gen_ai.request.max_tokens", max_tokens)


def finish_request(span: Any, record: UsageRecord) -> None:
    """What a request's span says of its end: tokens, tiers, status, cost."""
    if span is None:
        return
    span.set_attributes({
        "gen_ai.response.model": record.model,
        "gen_ai.usage.input_tokens": record.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "flexserve.tier.requested": record.requested_tier,
        "flexserve.tier.served": record.served_tier,
        "flexserve.status": record.status,
        "flexserve.cost_pico": record.costs.total,
    })


def refuse_request(span: Any, status: int, code: str | None) -> None:
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attributes({"http.response.status_code": status, "error.type": code or str(status)})
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


_otel_api: tuple[Any, Any] | None = None
_otel_looked_up = False


def inject_trace_context(headers: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` to an upstream call's headers
    (nothing when no span is current, or OpenTelemetry is absent)."""
    global _otel_api, _otel_looked_up
    if not _otel_looked_up:
        # Once: a failed import is not cached by Python, and this runs per upstream call.
        _otel_looked_up = True
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            pass
        else:
            _otel_api = (propagate, trace)
    if _otel_api is None:
        return
    propagate, trace = _otel_api
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)
