"""`/v1/responses` end to end: the official SDK against a real gateway in
front of the in-process sim engine; every response and stream event checked
against OpenAI's published schemas."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from conftest import Gateway, sim_model_id, sql_rows, wait_for
from openapi import validate
from test_error_shape import assert_envelope


@pytest.fixture(scope="module")
def model(sim_gateway: Gateway) -> str:
    return sim_model_id(sim_gateway)


def usage_row(gateway: Gateway, request_id: str) -> dict[str, Any] | None:
    rows = sql_rows(gateway.db_url, "SELECT * FROM usage_records WHERE request_id = :r", r=request_id)
    return rows[0] if rows else None


def test_create_reports_served_tier_usage_and_bills_once(sim_gateway: Gateway, model: str) -> None:
    raw = sim_gateway.client().responses.with_raw_response.create(
        model=model, input="Tell me about flex.", instructions="Be brief.",
        max_output_tokens=7, service_tier="flex",
    )
    response = raw.parse()
    validate(raw.http_response.json(), "Response")
    assert response.service_tier == "flex"
    assert response.status == "incomplete"  # max_output_tokens reached
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert len(response.output_text.split()) == 7
    assert response.usage is not None and response.usage.output_tokens == 7
    request_id = raw.headers["x-request-id"]
    wait_for(lambda: usage_row(sim_gateway, request_id) is not None)
    row = usage_row(sim_gateway, request_id)
    assert row is not None and row["served_tier"] == "flex" and row["completion_tokens"] == 7
    assert row["prompt_tokens"] == response.usage.input_tokens


def test_stream_events_are_typed_and_valid(sim_gateway: Gateway, model: str) -> None:
    events = list(sim_gateway.client().responses.create(
        model=model, input="Stream something.", max_output_tokens=5, stream=True,
    ))
    for event in events:
        validate(event.model_dump(mode="json", exclude_unset=True), "ResponseStreamEvent")
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds.count("response.output_text.delta") == 5
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == deltas
    # What was streamed is what was stored.
    stored = sim_gateway.client().responses.retrieve(final.id)
    assert stored.output_text == deltas and stored.id == final.id


def test_previous_response_id_carries_the_conversation(sim_gateway: Gateway, model: str) -> None:
    client = sim_gateway.client()
    first = client.responses.create(model=model, input="one two three", max_output_tokens=4)
    second = client.responses.create(
        model=model, input="four five", previous_response_id=first.id, max_output_tokens=3,
    )
    alone = client.responses.create(model=model, input="four five", max_output_tokens=3)
    assert first.usage is not None and second.usage is not None and alone.usage is not None
    # The engine was sent the first turn (its input and its answer) before the new input.
    assert second.usage.input_tokens > alone.usage.input_tokens
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id
    items = client.responses.input_items.list(second.id, order="asc")
    assert [item.type for item in items.data] == ["message"]


def test_instructions_are_not_carried_over(sim_gateway: Gateway, model: str) -> None:
    client = sim_gateway.client()
    long_instructions = " ".join(["rule"] * 50)
    first = client.responses.create(
        model=model, input="hi", instructions=long_instructions, max_output_tokens=2,
    )
    follow = client.responses.create(
        model=model, input="again", previous_response_id=first.id, max_output_tokens=2,
    )
    assert first.usage is not None and follow.usage is not None
    assert follow.usage.input_tokens < first.usage.input_tokens


def test_another_organizations_response_is_not_found(sim_gateway: Gateway, model: str) -> None:
    mine = sim_gateway.client().responses.create(model=model, input="secret", max_output_tokens=2)
    other_key = sim_gateway.new_key("other-org-responses")
    other = openai.OpenAI(base_url=sim_gateway.url + "/v1", api_key=other_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError) as refused:
        other.responses.create(
            model=model, input="continue", previous_response_id=mine.id, max_output_tokens=2,
        )
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["param"] == "previous_response_id"
    # Still there for its owner.
    assert sim_gateway.client().responses.retrieve(mine.id).id == mine.id


def test_a_previous_response_id_with_a_nul_is_not_found(sim_gateway: Gateway, model: str) -> None:
    # PostgreSQL refuses to look such an id up: it was a 500 there.
    with pytest.raises(openai.NotFoundError) as refused:
        sim_gateway.client().responses.create(
            model=model, input="continue", previous_response_id="resp_\x00", max_output_tokens=2,
        )
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["code"] == "previous_response_not_found"


def test_delete_then_gone(sim_gateway: Gateway, model: str) -> None:
    client = sim_gateway.client()
    response = client.responses.create(model=model, input="ephemeral", max_output_tokens=2)
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_store_false_keeps_nothing(sim_gateway: Gateway, model: str) -> None:
    client = sim_gateway.client()
    response = client.responses.create(model=model, input="x", max_output_tokens=2, store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def post(gateway: Gateway, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/responses", json=body,
                      headers={"Authorization": f"Bearer {gateway.api_key}"}, timeout=30)


@pytest.mark.parametrize(
    ("patch", "param", "status"),
    [
        ({"input": None}, "input", 400),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", 400),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role", 400),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", 400),
        ({"background": True}, "background", 400),
        ({"max_output_tokens": 0}, "max_output_tokens", 400),
        ({"service_tier": "turbo"}, "service_tier", 400),
        ({"include": ["file_search_call.results"]}, "include[0]", 400),
        ({"previous_response_id": "resp_nope"}, "previous_response_id", 404),
        ({"model": "no-such-model"}, "model", 404),
    ],
)
def test_bad_requests_name_the_param(sim_gateway: Gateway, model: str, patch: dict[str, Any],
                                     param: str, status: int) -> None:
    body = {"model": model, "input": "hi", **patch}
    body = {k: v for k, v in body.items() if v is not None}
    assert_envelope(post(sim_gateway, body), status, param=param)
