"""OpenTelemetry traces: a gateway with ``otlp_endpoint`` sends a span per
request, with its children and the GenAI attributes, to a collector (a real
OTLP/HTTP server run by the test, decoding what it receives with
OpenTelemetry's own protobuf types); an upstream engine's requests carry
the request's ``traceparent``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from conftest import Gateway, ServerThread, sim_engine
from flexserve.engines.sim import SimModel
from flexserve.engines.sim.server import create_sim_app

MESSAGES = [{"role": "user", "content": "Label this record."}]
MODEL = "llama3-8b-sim-h100"


class Collector:
    """The spans an OTLP/HTTP collector received."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        async def traces(request: Request) -> Response:
            export = ExportTraceServiceRequest()
            export.ParseFromString(await request.body())
            with self.lock:
                for resource_spans in export.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        self.spans.extend(scope_spans.spans)
            return Response(ExportTraceServiceResponse().SerializeToString(),
                            media_type="application/x-protobuf")

        return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])

    def trace_of(self, request_id: str, timeout: float = 10.0) -> tuple[Span, list[Span]]:
        """The request's span and its children, once they have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                roots = [s for s in self.spans if attributes(s).get("flexserve.request_id") == request_id]
                if roots:
                    root = roots[0]
                    children = [s for s in self.spans if s.parent_span_id == root.span_id]
                    if len(children) >= 4 or "http.response.status_code" in attributes(root):
                        return root, children
            assert time.monotonic() < deadline, f"no trace of {request_id} reached the collector"
            time.sleep(0.05)


def attributes(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


@pytest.fixture
def collector() -> Iterator[tuple[Collector, str]]:
    received = Collector()
    with ServerThread(received.app()) as server:
        yield received, server.url


def test_a_request_is_one_span_with_its_stages_and_genai_attributes(
    start_gateway: Callable[..., Gateway], collector: tuple[Collector, str]
) -> None:
    received, url = collector
    gateway = start_gateway(engines=[sim_engine()], engine="sim", otlp_endpoint=url,
                            otel_service_name="gateway-under-test")
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, service_tier="flex")
    completion = raw.parse()
    root, children = received.trace_of(raw.headers["x-request-id"])
    assert root.name == f"chat {MODEL}" and root.kind == Span.SPAN_KIND_SERVER
    seen = attributes(root)
    assert completion.usage is not None
    assert seen["gen_ai.operation.name"] == "chat" and seen["gen_ai.request.model"] == MODEL
    assert seen["gen_ai.request.max_tokens"] == 6
    assert (seen["gen_ai.usage.input_tokens"], seen["gen_ai.usage.output_tokens"]) \
        == (completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert (seen["flexserve.tier.requested"], seen["flexserve.tier.served"], seen["flexserve.status"]) \
        == ("flex", "flex", "completed")
    assert seen["flexserve.org_id"].startswith("org")
    # Its stages, in order, within it, in its trace.
    assert [c.name for c in sorted(children, key=lambda s: s.start_time_unix_nano)] \
        == ["gates", "queue", "engine", "metering"]
    for child in children:
        assert child.trace_id == root.trace_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= root.end_time_unix_nano
    # A refused request has its span too, with the status it got.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=-1)
    root, _ = received.trace_of(refused.value.response.headers["x-request-id"])
    assert attributes(root)["http.response.status_code"] == 400


def test_upstream_calls_carry_the_requests_traceparent(
    start_gateway: Callable[..., Gateway], collector: tuple[Collector, str]
) -> None:
    received, url = collector
    heard: list[dict[str, str]] = []
    engine_app = create_sim_app(SimModel("h100-llama3-8b", speed=50.0))

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            heard.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await engine_app(scope, receive, send)

    with ServerThread(recording) as upstream:
        gateway = start_gateway(engine="upstream", upstreams=[upstream.url], otlp_endpoint=url)
        raw = gateway.client().chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=3)
        root, _ = received.trace_of(raw.headers["x-request-id"])
    [headers] = heard
    version, trace_id, parent_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id) == ("00", root.trace_id.hex())
    assert int(flags, 16) & 1  # sampled
    assert parent_id == root.span_id.hex()
