"""The OpenAI-compatible API end to end: the official SDK against a real
gateway on loopback, in front of the in-process sim engine."""

from __future__ import annotations


import httpx
import openai
import pytest

from conftest import Gateway, sim_model_id, usage_rows, wait_for
from openapi import validate

MESSAGES = [{"role": "user", "content": "Tell me about flex processing."}]


@pytest.fixture(scope="module")
def model(sim_gateway: Gateway) -> str:
    return sim_model_id(sim_gateway)


@pytest.mark.parametrize(
    ("requested", "served"),
    [(None, "default"), ("auto", "default"), ("default", "default"), ("flex", "flex"),
     ("priority", "priority"), ("scale", "default")],
)
def test_non_stream_reports_served_tier(sim_gateway: Gateway, model: str, requested: str | None, served: str) -> None:
    client = sim_gateway.client()
    extra = {} if requested is None else {"service_tier": requested}
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=7, seed=1, **extra  # type: ignore[arg-type]
    )
    completion = raw.parse()
    body = raw.http_response.json()
    validate(body, "CreateChatCompletionResponse")
    assert completion.service_tier == served
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    assert completion.choices[0].message.content
    assert raw.headers["x-request-id"].startswith("req_")


def test_stream_with_usage_every_chunk_valid(sim_gateway: Gateway, model: str) -> None:
    client = sim_gateway.client()
    chunks = list(
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=12, stream=True,
            stream_options={"include_usage": True}, service_tier="flex",
        )
    )
    for chunk in chunks:
        validate(chunk.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse")
        assert chunk.service_tier == "flex"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert len(text.split()) == 12


def test_stream_without_usage_has_no_usage_chunk(sim_gateway: Gateway, model: str) -> None:
    chunks = list(
        sim_gateway.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, stream=True)
    )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_async_client_stream_and_not(sim_gateway: Gateway, model: str) -> None:
    client = sim_gateway.async_client()
    completion = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, seed=5)
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=5, stream=True, service_tier="flex", seed=5
    )
    texts = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(t or "" for t in texts).split() == completion.choices[0].message.content.split()  # type: ignore[union-attr]
    await client.close()


def test_same_seed_same_text(sim_gateway: Gateway, model: str) -> None:
    client = sim_gateway.client()
    a = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=9, seed=42)
    b = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=9, seed=42)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_models_list_and_retrieve(sim_gateway: Gateway, model: str) -> None:
    client = sim_gateway.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert "sim" in model
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_usage_record_written_once(sim_gateway: Gateway, model: str) -> None:
    raw = sim_gateway.client().chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=4, service_tier="flex"
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    wait_for(lambda: len(usage_rows(sim_gateway, request_id)) == 1)
    (row,) = usage_rows(sim_gateway, request_id)
    assert row["served_tier"] == "flex" and row["requested_tier"] == "flex"
    assert row["status"] == "completed"
    assert row["completion_tokens"] == 4
    assert row["prompt_tokens"] == completion.usage.prompt_tokens  # type: ignore[union-attr]
    assert row["model"] == model


def test_refused_request_writes_no_usage(sim_gateway: Gateway, model: str) -> None:
    with sim_gateway.http() as http:
        response = http.post("/v1/chat/completions", json={"model": model, "messages": [], "max_tokens": 3})
    assert response.status_code == 400
    request_id = response.headers["x-request-id"]
    # A later request's row proves the writer has flushed past this one.
    test_usage_record_written_once(sim_gateway, model)
    assert usage_rows(sim_gateway, request_id) == []


def test_redirect_fields_never_change_destination(sim_gateway: Gateway, model: str) -> None:
    """Fields some gateways honour (api_base, api_key…) are never acted on: an
    engine that takes no unknown fields refuses them by name, nothing billed."""
    with pytest.raises(openai.BadRequestError) as refused:
        sim_gateway.client().chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=3,
            extra_body={"api_base": "http://127.0.0.1:9/", "api_key": "sk-stolen"},
        )
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "api_base"
    assert error["code"] == "unknown_parameter"


def test_metrics_count_requests_by_tier(sim_gateway: Gateway, model: str) -> None:
    sim_gateway.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, service_tier="flex")
    text = httpx.get(sim_gateway.url + "/metrics").text
    assert f'flexserve_requests_total{{model="{model}",status="completed",tier="flex"}}' in text
    assert "flexserve_queue_depth" in text
    assert sim_gateway.api_key not in text


def test_metrics_count_refusals_without_a_series_per_made_up_model(sim_gateway: Gateway, model: str) -> None:
    client = sim_gateway.client()
    for name in ("no-such-model-1", "no-such-model-2"):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=-1)
    text = httpx.get(sim_gateway.url + "/metrics").text
    assert "no-such-model" not in text
    assert 'flexserve_requests_total{model="unknown",status="model_not_found",tier="none"}' in text
    # Refused before its model was read: no model to name.
    assert 'flexserve_requests_total{model="unknown",status="integer_below_min_value",tier="none"}' in text
    assert 'tier=""' not in text


def test_healthz(sim_gateway: Gateway, model: str) -> None:
    response = httpx.get(sim_gateway.url + "/healthz")
    assert response.status_code == 200
    assert response.json()["models"] == {model: 1}
