"""Structured outputs and tools pass through the gateway to vLLM's guided
decoding: from random weights, JSON valid against the schema and well-formed
tool calls; streamed tool-call deltas reassemble into the call the whole
answer has; every answer and chunk valid against OpenAI's schemas.

Schemas here are bounded (enums, integer ranges, short strings): a random
model writes within a grammar, but only a bounded one makes it finish."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from conftest import Gateway, billed
from openapi import validate

from .support import VllmServer, sse_chunks

MESSAGES = [{"role": "user", "content": "What is the weather in Lyon for the next three days?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Lyon", "Paris", "Nice"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
NOOP = {"type": "function", "function": {
    "name": "noop", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "noop": NOOP["function"]["parameters"]}  # type: ignore[index]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]},
                 "minItems": 1, "maxItems": 3},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "verified"],
    "additionalProperties": False,
}
# Greedy: the whole and the streamed answer are the same call.
GREEDY = {"temperature": 0}


def whole(gateway: Gateway, vllm: VllmServer, **body: Any) -> tuple[dict[str, Any], str]:
    with gateway.http() as http:
        response = http.post("/v1/chat/completions", json={
            "model": vllm.model, "messages": MESSAGES, "max_tokens": 200, **GREEDY, **body})
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    validate(document, "CreateChatCompletionResponse")
    return document, response.headers["x-request-id"]


def streamed(gateway: Gateway, vllm: VllmServer, **body: Any) -> list[dict[str, Any]]:
    """The chunks of a streamed answer, each valid against OpenAI's schema."""
    request = {"model": vllm.model, "messages": MESSAGES, "max_tokens": 200, "stream": True,
               "stream_options": {"include_usage": True}, **GREEDY, **body}
    with gateway.http() as http, http.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200, response.read()
        chunks = sse_chunks(response)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks


def reassembled(chunks: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """Streamed tool-call pieces put together by their index, as a client does."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for piece in choice["delta"].get("tool_calls") or ():
                call = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
                call["id"] += piece.get("id") or ""
                function = piece.get("function") or {}
                call["name"] += function.get("name") or ""
                call["arguments"] += function.get("arguments") or ""
    return calls


def finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]


@pytest.mark.parametrize(
    ("tool_choice", "finish_reason"),
    [("required", "tool_calls"),
     # OpenAI (and vLLM) end a call to a named function with "stop".
     ({"type": "function", "function": {"name": "get_weather"}}, "stop")],
    ids=["required", "named"],
)
def test_tool_call_whole_and_streamed_are_the_same_call(
    gateway: Gateway, vllm: VllmServer, tool_choice: Any, finish_reason: str
) -> None:
    body = {"tools": [NOOP, WEATHER], "tool_choice": tool_choice, "parallel_tool_calls": False}
    document, request_id = whole(gateway, vllm, **body)
    [choice] = document["choices"]
    assert choice["finish_reason"] == finish_reason
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    name = call["function"]["name"]
    if isinstance(tool_choice, dict):
        assert name == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
    assert billed(gateway, request_id)["completion_tokens"] == document["usage"]["completion_tokens"] > 0

    chunks = streamed(gateway, vllm, **body)
    calls = reassembled(chunks)
    assert list(calls) == [0]
    assert calls[0]["id"] and calls[0]["name"] == name
    # The same arguments; not always the same text: for tool_choice
    # "required" vLLM writes a whole answer's arguments out again with
    # json.dumps, and streams them as generated.
    assert json.loads(calls[0]["arguments"]) == json.loads(call["function"]["arguments"])
    assert sum(1 for chunk in chunks for c in chunk["choices"] if c["delta"].get("tool_calls")) > 2
    assert finish_reasons(chunks) == [finish_reason]
    assert chunks[-1]["usage"]["completion_tokens"] == document["usage"]["completion_tokens"]


def test_streamed_tool_call_pieces_are_valid_as_sent(gateway: Gateway, vllm: VllmServer) -> None:
    """vLLM writes `"name": null` in a call's pieces after the first (with
    tool_choice "required"); the relay leaves null members out, as OpenAI
    writes them, so each chunk is valid as sent."""
    chunks = streamed(gateway, vllm, tools=[NOOP, WEATHER], tool_choice="required",
                      parallel_tool_calls=False)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")


def test_json_schema_answer_validates_whole_and_streamed(gateway: Gateway, vllm: VllmServer) -> None:
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    document, _ = whole(gateway, vllm, response_format=response_format)
    [choice] = document["choices"]
    assert choice["finish_reason"] == "stop"
    answer = json.loads(choice["message"]["content"])
    jsonschema.validate(answer, PERSON)

    chunks = streamed(gateway, vllm, response_format=response_format)
    text = "".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"])
    assert json.loads(text) == answer
    assert finish_reasons(chunks) == ["stop"]


def test_tool_results_go_back_to_the_model(gateway: Gateway, vllm: VllmServer) -> None:
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Lyon", "unit": "celsius", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    document, _ = whole(gateway, vllm, messages=messages, tools=[WEATHER], tool_choice="none",
                        max_tokens=6, ignore_eos=True)
    [choice] = document["choices"]
    assert choice["message"]["content"] and not choice["message"].get("tool_calls")
    assert document["usage"]["completion_tokens"] == 6
