"""Everything an eval or enrichment job sends passes through, on every
inference endpoint: tools, structured outputs, logprobs, `n`, completions,
embeddings — against the in-process sim engine and against a sim-engine
server behind the gateway as an upstream (as vLLM would be). Every answer
and chunk is checked against OpenAI's published schemas."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import openai
import pytest

from conftest import Gateway, ServerThread, billed, sim_engine, sim_model_id, usage_rows
from flexserve.engines.sim import SimModel
from flexserve.engines.sim.server import create_sim_app
from openapi import validate

MESSAGES = [{"role": "user", "content": "Extract the city from: 'I live in Lyon.'"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "address": {"$ref": "#/$defs/address"},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}},
}


@pytest.fixture(scope="module")
def sim_upstream() -> Iterator[ServerThread]:
    with ServerThread(create_sim_app(SimModel("h100-llama3-8b", speed=50.0, max_num_seqs=16))) as server:
        yield server


@pytest.fixture(scope="module", params=["sim", "upstream"])
def gateway(request: pytest.FixtureRequest, start_gateway: Callable[..., Gateway]) -> Gateway:
    if request.param == "sim":
        return start_gateway(engines=[sim_engine()], engine="sim")
    upstream: ServerThread = request.getfixturevalue("sim_upstream")
    return start_gateway(engine="upstream", upstreams=[upstream.url])


@pytest.fixture(scope="module")
def model(gateway: Gateway) -> str:
    return sim_model_id(gateway)


# --- chat ------------------------------------------------------------------------


def test_tool_call_whole_and_streamed_are_the_same_call(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, tools=[WEATHER], tool_choice="required", seed=11,
    )
    validate(raw.http_response.json(), "CreateChatCompletionResponse")
    whole = raw.parse().choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.tool_calls is not None and len(whole.message.tool_calls) == 1
    call = whole.message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]

    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, tools=[WEATHER], tool_choice="required", seed=11,
        stream=True,
    ))
    pieces: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        validate(chunk.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse")
        for choice in chunk.choices:
            for piece in choice.delta.tool_calls or ():
                entry = pieces.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += piece.id or ""
                if piece.function is not None:
                    entry["name"] += piece.function.name or ""
                    entry["arguments"] += piece.function.arguments or ""
    assert len(pieces) == 1
    assert sum(1 for c in chunks for ch in c.choices if ch.delta.tool_calls) > 2  # really streamed
    assert pieces[0] == {"id": call.id, "name": "get_weather", "arguments": call.function.arguments}  # type: ignore[union-attr]


def test_named_tool_choice(gateway: Gateway, model: str) -> None:
    other = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}
    completion = gateway.client().chat.completions.create(
        model=model, messages=MESSAGES, tools=[other, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = completion.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "get_weather"  # type: ignore[union-attr]


def test_tool_results_go_back_to_the_model(gateway: Gateway, model: str) -> None:
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    completion = gateway.client().chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=6,
    )
    assert completion.choices[0].message.content
    assert completion.choices[0].message.tool_calls is None


def test_json_schema_answer_validates(gateway: Gateway, model: str) -> None:
    completion = gateway.client().chat.completions.create(
        model=model, messages=MESSAGES, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                 "strict": True}},
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), PERSON)
    completion = gateway.client().chat.completions.create(
        model=model, messages=MESSAGES, response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_logprobs_have_openais_shape(gateway: Gateway, model: str) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3,
    )
    validate(raw.http_response.json(), "CreateChatCompletionResponse")
    logprobs = raw.parse().choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 5
    for entry in logprobs.content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.token in [top.token for top in entry.top_logprobs]
    chunks = list(gateway.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2, stream=True,
    ))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.content
                for e in ch.logprobs.content]
    assert len(streamed) == 5 and all(len(e.top_logprobs) == 2 for e in streamed)


def test_n_choices_are_billed_for_all(gateway: Gateway, model: str) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=4, n=3, service_tier="flex",
    )
    completion = raw.parse()
    assert sorted(c.index for c in completion.choices) == [0, 1, 2]
    assert len({c.message.content for c in completion.choices}) == 3
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    row = billed(gateway, raw.headers["x-request-id"])
    assert row["completion_tokens"] == 12 and row["served_tier"] == "flex"
    chunks = list(gateway.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, n=3, stream=True,
    ))
    finished = sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason)
    assert finished == [0, 1, 2]


def test_penalties_seed_stop_and_metadata_pass(gateway: Gateway, model: str) -> None:
    completion = gateway.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=5, presence_penalty=0.5, frequency_penalty=0.3,
        logit_bias={"7": -50}, seed=9, stop=["never-seen"], user="eval-1", metadata={"job": "x"},
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 5


# --- completions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "num_prompts"),
    [("Once upon a time", 1), (["one", "two words"], 2), ([101, 102, 103], 1), ([[1, 2], [3]], 2)],
)
def test_completions_take_every_prompt_form(gateway: Gateway, model: str, prompt: Any,
                                            num_prompts: int) -> None:
    raw = gateway.client().completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=3, n=2, extra_body={"service_tier": "flex"},
    )
    validate(raw.http_response.json(), "CreateCompletionResponse")
    completion = raw.parse()
    assert sorted(c.index for c in completion.choices) == list(range(2 * num_prompts))
    assert completion.usage is not None and completion.usage.completion_tokens == 6 * num_prompts
    assert raw.http_response.json()["service_tier"] == "flex"
    assert billed(gateway, raw.headers["x-request-id"])["completion_tokens"] == 6 * num_prompts


def test_completions_echo_and_logprobs(gateway: Gateway, model: str) -> None:
    completion = gateway.client().completions.create(
        model=model, prompt="the quick brown fox", max_tokens=0, echo=True, logprobs=1,
    )
    choice = completion.choices[0]
    assert choice.text.startswith("the") or choice.text.strip().startswith("the")
    assert choice.logprobs is not None and choice.logprobs.tokens
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs or [])


def test_completions_stream(gateway: Gateway, model: str) -> None:
    chunks = list(gateway.client().completions.create(
        model=model, prompt="Count:", max_tokens=6, stream=True, stream_options={"include_usage": True},
    ))
    text = "".join(ch.text for c in chunks for ch in c.choices)
    assert len(text.split()) == 6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_completions_default_to_sixteen_tokens(gateway: Gateway, model: str) -> None:
    completion = gateway.client().completions.create(model=model, prompt="Go on")
    assert completion.usage is not None and completion.usage.completion_tokens == 16


# --- embeddings ----------------------------------------------------------------------


def test_embeddings_float_and_base64_agree(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    raw = client.embeddings.with_raw_response.create(
        model=model, input=["first text", "second text"], encoding_format="float",
        extra_body={"service_tier": "flex"},
    )
    body = raw.http_response.json()
    validate(body, "CreateEmbeddingResponse")
    assert body["service_tier"] == "flex"
    floats = [item["embedding"] for item in body["data"]]
    assert [item["index"] for item in body["data"]] == [0, 1] and floats[0] != floats[1]
    encoded = client.embeddings.with_raw_response.create(
        model=model, input=["first text", "second text"], encoding_format="base64",
    ).http_response.json()
    for vector, item in zip(floats, encoded["data"], strict=True):
        raw_bytes = base64.b64decode(item["embedding"])
        decoded = struct.unpack(f"<{len(raw_bytes) // 4}f", raw_bytes)
        assert decoded == pytest.approx(vector, rel=1e-6)
    row = billed(gateway, raw.headers["x-request-id"])
    assert row["prompt_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert row["completion_tokens"] == 0 and row["served_tier"] == "flex"


def test_embeddings_dimensions_and_token_input(gateway: Gateway, model: str) -> None:
    response = gateway.client().embeddings.create(model=model, input=[[5, 6, 7]], dimensions=8)
    assert len(response.data[0].embedding) == 8


# --- what an engine cannot do ---------------------------------------------------------


def test_refused_fields_name_the_param_and_bill_nothing(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.with_raw_response.create(
            model=model, prompt="x", max_tokens=3, suffix="y",
        )
    assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "suffix"
    request_id = refused.value.response.headers["x-request-id"]
    # A later request's row proves the writer flushed past the refused one.
    ok = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=1)
    billed(gateway, ok.headers["x-request-id"])
    assert usage_rows(gateway, request_id) == []
