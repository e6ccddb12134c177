"""The sim engine served for real on loopback, driven by the official openai SDK
and by plain HTTP, its answers checked against OpenAI's published schemas."""

from __future__ import annotations

import base64
import json
import math
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from prometheus_client.parser import text_string_to_metric_families

from flexserve.engines.sim import SimModel
from flexserve.engines.sim.server import create_sim_app
from openapi import validate

# 4 + 3 + 2 = 9 prompt tokens for the sim tokenizer.
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say something nice"}]


@contextmanager
def serving(model: SimModel) -> Iterator[str]:
    """Run the sim server in a thread on a free port, with the production settings."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_sim_app(model), loop="uvloop", http="httptools",
                            access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # start-up only; the server has no readiness hook
        assert thread.is_alive() and time.monotonic() < deadline, "sim server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def instant() -> Iterator[tuple[SimModel, str]]:
    model = SimModel("instant")
    with serving(model) as url:
        yield model, url


@pytest.fixture(scope="module")
def timed() -> Iterator[tuple[SimModel, str]]:
    model = SimModel("h100-llama3-8b", speed=20, scheduling_policy="priority")
    with serving(model) as url:
        yield model, url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels dropped: one model per server)."""
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if "le" not in s.labels}


@pytest.mark.parametrize("fixture", ["instant", "timed"])
def test_non_stream(fixture: str, request: pytest.FixtureRequest) -> None:
    model, url = request.getfixturevalue(fixture)
    reply = client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                                 max_tokens=7, seed=3)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == model.model_id
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len((choice.message.content or "").split()) == 7
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (9, 7, 16)


@pytest.mark.parametrize("fixture", ["instant", "timed"])
def test_stream_with_usage(fixture: str, request: pytest.FixtureRequest) -> None:
    model, url = request.getfixturevalue(fixture)
    chunks = list(client(url).chat.completions.create(
        model=model.model_id, messages=MESSAGES, seed=5, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert [c.choices[0].finish_reason for c in content].count("stop") == 1
    assert content[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert len(text.split()) == usage_chunk.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == 9
    # Same seed, same text, streamed or not.
    whole = client(url).chat.completions.create(model=model.model_id, messages=MESSAGES, seed=5)
    assert whole.choices[0].message.content == text


def test_a_requests_stream_interval_batches_its_tokens_as_vllms_does(timed: tuple[SimModel, str]) -> None:
    """vLLM's per-request `stream_interval`: the first token at once, then a
    chunk every N tokens, and the rest with the finish; the same text."""
    model, url = timed

    def chunk_words(extra: dict[str, Any]) -> list[str]:
        chunks = client(url).chat.completions.create(
            model=model.model_id, messages=MESSAGES, max_tokens=10, seed=7, stream=True,
            extra_body=extra)
        return [c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta.content]

    each = chunk_words({})
    batched = chunk_words({"stream_interval": 4})
    assert len(each) == 10
    assert [len(text.split()) for text in batched] == [1, 4, 4, 1]
    assert "".join(batched) == "".join(each)


def test_priority_is_refused_under_fcfs(instant: tuple[SimModel, str]) -> None:
    model, url = instant
    with pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                            extra_body={"priority": 2})
    assert info.value.body["param"] == "priority"  # type: ignore[index]
    # Priority 0 is the default and always fine.
    client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                        extra_body={"priority": 0})


def test_priority_is_accepted_under_priority_policy(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    reply = client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                                max_tokens=2, extra_body={"priority": -3})
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"model": "sim-instant"}',
                                  b'{"model": "sim-instant", "messages": []}'])
def test_bad_requests_get_vllms_envelope(instant: tuple[SimModel, str], body: bytes) -> None:
    """OpenAI's members; vLLM names the type after the status and gives the
    status as the code."""
    _, url = instant
    response = httpx.post(f"{url}/v1/chat/completions", content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("BadRequestError", 400)


def test_unknown_model_is_404_and_long_prompt_is_400(instant: tuple[SimModel, str]) -> None:
    model, url = instant
    with pytest.raises(openai.NotFoundError) as missing:
        client(url).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert missing.value.body == {"message": missing.value.body["message"], "type": "NotFoundError",  # type: ignore[index]
                                  "param": "model", "code": 404}
    with pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(
            model=model.model_id, messages=[{"role": "user", "content": "w " * 9000}])
    assert info.value.body["param"] == "input_tokens"  # type: ignore[index]


def test_max_tokens_past_the_room_left_is_cut_not_refused(instant: tuple[SimModel, str]) -> None:
    """As vLLM: generation stops when the context is full; only a max_tokens
    past the whole context is refused."""
    model, url = instant
    reply = client(url).completions.create(model=model.model_id, prompt="w " * 8000,
                                           max_tokens=500)
    assert reply.usage is not None and reply.usage.completion_tokens == model.max_model_len - 8000
    assert reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client(url).completions.create(model=model.model_id, prompt="w",
                                       max_tokens=model.max_model_len + 1)
    assert info.value.body["param"] == "max_tokens"  # type: ignore[index]


def test_the_answer_id_is_the_clients_request_id(instant: tuple[SimModel, str]) -> None:
    model, url = instant
    headers = {"X-Request-Id": "req_abc"}
    chat = httpx.post(f"{url}/v1/chat/completions", headers=headers, json={
        "model": model.model_id, "messages": MESSAGES, "max_tokens": 2}).json()
    completion = httpx.post(f"{url}/v1/completions", headers=headers, json={
        "model": model.model_id, "prompt": "x", "max_tokens": 2}).json()
    assert (chat["id"], completion["id"]) == ("chatcmpl-req_abc", "cmpl-req_abc")


def test_tokenize_counts_what_usage_counts(instant: tuple[SimModel, str]) -> None:
    """vLLM's own /tokenize and /detokenize, on the sim tokenizer."""
    model, url = instant
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    reply = client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                                tools=tools, tool_choice="none", max_tokens=1)  # type: ignore[list-item]
    tokenized = httpx.post(f"{url}/tokenize", json={
        "model": model.model_id, "messages": MESSAGES, "tools": tools}).json()
    assert reply.usage is not None and tokenized["count"] == reply.usage.prompt_tokens
    assert tokenized["count"] == len(tokenized["tokens"])
    assert tokenized["max_model_len"] == model.max_model_len
    text = " the model decodes a token"
    ids = httpx.post(f"{url}/tokenize", json={"prompt": text}).json()["tokens"]
    assert len(ids) == 5 and all(0 <= i < 128_256 for i in ids)
    by_ids = client(url).completions.create(model=model.model_id, prompt=ids, max_tokens=1)
    by_text = client(url).completions.create(model=model.model_id, prompt=text, max_tokens=1)
    assert by_ids.usage is not None and by_text.usage is not None
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == 5
    # Filler words come back as they went; other words as the filler their ids pick.
    filler = httpx.post(f"{url}/tokenize", json={"prompt": " the model"}).json()["tokens"]
    assert httpx.post(f"{url}/detokenize", json={"tokens": filler}).json() == {"prompt": " the model"}
    assert httpx.post(f"{url}/tokenize", json={"model": "gpt-4o", "prompt": "x"}).status_code == 404
    assert httpx.post(f"{url}/detokenize", json={"tokens": "x"}).json()["error"]["param"] == "tokens"


def test_models_list(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    [card] = client(url).models.list().data
    assert card.id == model.model_id == "llama3-8b-sim-h100"


def test_metrics_use_vllm_names(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    client(url).chat.completions.create(model=model.model_id, messages=MESSAGES, max_tokens=4)
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:num_preemptions": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
        assert all(s.labels["model_name"] == model.model_id and s.labels["engine"] == "0"
                   for s in families[name].samples)
    samples = metrics(url)
    assert samples["vllm:generation_tokens_total"] >= 4
    assert samples["vllm:num_preemptions_total"] == 0
    # No prefix cache in the sim: every prompt token is a query, none a hit.
    assert samples["vllm:prefix_cache_queries_total"] == samples["vllm:prompt_tokens_total"] > 0
    assert samples["vllm:prefix_cache_hits_total"] == 0
    assert samples["vllm:time_to_first_token_seconds_count"] >= 1


def wait_until_idle(url: str) -> dict[str, float]:
    deadline = time.monotonic() + 5
    while True:
        samples = metrics(url)
        if samples["vllm:num_requests_running"] == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def test_client_disconnect_aborts_the_sequence(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    # 8,000 tokens take ~2.6 s at 20x; an aborted one stops after a few.
    max_tokens = 8000
    before = metrics(url)["vllm:generation_tokens_total"]
    stream = client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                                 max_tokens=max_tokens, stream=True)
    next(iter(stream))
    next(iter(stream))
    assert metrics(url)["vllm:num_requests_running"] == 1
    stream.close()
    samples = wait_until_idle(url)
    assert samples["vllm:num_requests_running"] == 0
    assert samples["vllm:kv_cache_usage_perc"] == 0
    assert samples["vllm:generation_tokens_total"] - before < max_tokens / 2
    # A non-streamed request whose client gives up is aborted too.
    before = samples["vllm:generation_tokens_total"]
    with pytest.raises(openai.APITimeoutError):
        client(url).with_options(timeout=0.3).chat.completions.create(
            model=model.model_id, messages=MESSAGES, max_tokens=max_tokens)
    samples = wait_until_idle(url)
    assert samples["vllm:num_requests_running"] == 0
    assert samples["vllm:generation_tokens_total"] - before < max_tokens / 2


# --- the whole surface: n, tools, logprobs, structured output ---------------------------------

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1,
                                                          "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
]


def raw_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    """A stream's JSON chunks, up to the [DONE] it must end with."""
    lines = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def merged_stream(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Stream chunks merged per choice as a client merges them."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            merged = choices.setdefault(choice["index"], {"content": "", "tool_calls": {},
                                                          "logprobs": [], "finish_reason": None})
            delta = choice["delta"]
            merged["content"] += delta.get("content") or ""
            for piece in delta.get("tool_calls") or ():
                call = merged["tool_calls"].setdefault(piece["index"], {
                    "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                call["id"] = piece.get("id") or call["id"]
                function = piece.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("logprobs"):
                merged["logprobs"] += choice["logprobs"]["content"]
            merged["finish_reason"] = choice["finish_reason"] or merged["finish_reason"]
    return choices


@pytest.mark.parametrize("fixture", ["instant", "timed"])
def test_n_choices_whole_and_streamed(fixture: str, request: pytest.FixtureRequest) -> None:
    model, url = request.getfixturevalue(fixture)
    body = {"model": model.model_id, "messages": MESSAGES, "n": 3, "max_tokens": 5, "seed": 8}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body).json()
    validate(whole, "CreateChatCompletionResponse")
    texts = [c["message"]["content"] for c in whole["choices"]]
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    assert all(len(t.split()) == 5 for t in texts)
    assert whole["usage"] == {"prompt_tokens": 9, "completion_tokens": 15, "total_tokens": 24}
    streamed = httpx.post(f"{url}/v1/chat/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = raw_chunks(streamed)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    # A role chunk opens each choice, as vLLM sends them.
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"].get("role")) for c in chunks[:3]] \
        == [(0, "assistant"), (1, "assistant"), (2, "assistant")]
    merged = merged_stream(chunks)
    assert [merged[i]["content"] for i in range(3)] == texts
    assert all(merged[i]["finish_reason"] == "length" for i in range(3))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("fixture", ["instant", "timed"])
def test_tool_calls_stream_as_they_answer_whole(fixture: str,
                                                request: pytest.FixtureRequest) -> None:
    model, url = request.getfixturevalue(fixture)
    sdk = client(url)
    whole = sdk.chat.completions.create(model=model.model_id, messages=MESSAGES, tools=TOOLS,
                                        seed=4)
    validate(whole.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    [choice] = whole.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.Draft202012Validator(WEATHER).validate(json.loads(call.function.arguments))
    chunks = raw_chunks(httpx.post(f"{url}/v1/chat/completions", json={
        "model": model.model_id, "messages": MESSAGES, "tools": TOOLS, "seed": 4,
        "stream": True}))
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    merged = merged_stream(chunks)[0]
    assert merged["finish_reason"] == "tool_calls"
    assert merged["tool_calls"] == {0: call.model_dump(mode="json")}


def test_logprobs_and_json_schema(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    body = {"model": model.model_id, "messages": MESSAGES, "seed": 2, "logprobs": True,
            "top_logprobs": 4, "response_format": {"type": "json_schema", "json_schema": {
                "name": "weather", "schema": WEATHER, "strict": True}}}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body).json()
    validate(whole, "CreateChatCompletionResponse")
    [choice] = whole["choices"]
    text = choice["message"]["content"]
    jsonschema.Draft202012Validator(WEATHER).validate(json.loads(text))
    entries = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == text
    assert len(entries) == whole["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 4 and e["top_logprobs"][0]["token"] == e["token"]
               for e in entries)
    chunks = raw_chunks(httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}))
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    merged = merged_stream(chunks)[0]
    assert merged["content"] == text and merged["logprobs"] == entries


# --- completions --------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "num_prompts", "prompt_tokens"), [
    ("say something nice", 1, 3),
    (["say something", "nice"], 2, 3),
    ([9, 8, 7, 6, 5], 1, 5),
    ([[1, 2], [3]], 2, 3),
])
def test_completions_take_every_prompt_form(instant: tuple[SimModel, str], prompt: Any,
                                            num_prompts: int, prompt_tokens: int) -> None:
    model, url = instant
    reply = client(url).completions.create(model=model.model_id, prompt=prompt, n=2,
                                           max_tokens=4, logprobs=1)
    validate(reply.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert [c.index for c in reply.choices] == list(range(2 * num_prompts))
    for choice in reply.choices:
        assert len(choice.text.split()) == 4 and choice.finish_reason == "length"
        assert choice.logprobs is not None and "".join(choice.logprobs.tokens or []) == choice.text
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        prompt_tokens, 8 * num_prompts)


def test_completions_default_to_sixteen_tokens(instant: tuple[SimModel, str]) -> None:
    model, url = instant
    reply = httpx.post(f"{url}/v1/completions", json={"model": model.model_id, "prompt": "x"})
    assert reply.json()["usage"]["completion_tokens"] == 16


def test_completions_stream_with_echo(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    sdk = client(url)
    whole = sdk.completions.create(model=model.model_id, prompt="Once upon", max_tokens=6,
                                   echo=True, seed=6)
    [choice] = whole.choices
    assert choice.text.startswith("Once upon") and len(choice.text.split()) == 8
    stream = sdk.completions.create(model=model.model_id, prompt="Once upon", max_tokens=6,
                                    echo=True, seed=6, stream=True,
                                    stream_options={"include_usage": True})
    chunks = list(stream)
    for chunk in chunks:
        # The spec's finish_reason is never null, though every stream's is until
        # its end (OpenAI's and vLLM's alike): check the chunks that have one.
        if not chunk.choices or chunk.choices[0].finish_reason is not None:
            validate(chunk.model_dump(mode="json", exclude_unset=True),
                     "CreateCompletionResponse")
    *parts, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in parts) == choice.text
    assert parts[0].choices[0].text.startswith("Once upon")
    assert [c.choices[0].finish_reason for c in parts].count("length") == 1
    assert usage_chunk.usage is not None and usage_chunk.usage == whole.usage


def test_completions_echo_with_logprobs_and_max_tokens_zero(instant: tuple[SimModel, str]) -> None:
    model, url = instant
    reply = httpx.post(f"{url}/v1/completions", json={
        "model": model.model_id, "prompt": "one two three", "max_tokens": 0, "echo": True,
        "logprobs": 0}).json()
    [choice] = reply["choices"]
    assert (choice["text"], choice["finish_reason"]) == ("one two three", "length")
    assert choice["logprobs"]["tokens"] == ["one", " two", " three"]
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["text_offset"] == [0, 3, 7]
    # vLLM generates one token it does not show, and counts it.
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


# --- embeddings ---------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["instant", "timed"])
def test_embeddings_float_and_base64(fixture: str, request: pytest.FixtureRequest) -> None:
    model, url = request.getfixturevalue(fixture)
    inputs = ["the first text", "a second"]
    raw = httpx.post(f"{url}/v1/embeddings", json={"model": model.model_id, "input": inputs})
    body = raw.json()
    validate(body, "CreateEmbeddingResponse")
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    vectors = [item["embedding"] for item in body["data"]]
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(len(v) == model.profile.embedding_dim for v in vectors)
    packed = httpx.post(f"{url}/v1/embeddings", json={
        "model": model.model_id, "input": inputs, "encoding_format": "base64"}).json()
    decoded = [list(struct.unpack(f"<{len(v)}f", base64.b64decode(item["embedding"])))
               for v, item in zip(vectors, packed["data"], strict=True)]
    assert decoded == vectors
    # The SDK asks for base64 itself and decodes it.
    sdk = client(url).embeddings.create(model=model.model_id, input=inputs)
    assert [d.embedding for d in sdk.data] == vectors
    short = client(url).embeddings.create(model=model.model_id, input=[[1, 2, 3]], dimensions=16)
    assert len(short.data[0].embedding) == 16 and short.usage.prompt_tokens == 3
    assert math.isclose(math.fsum(x * x for x in short.data[0].embedding), 1.0, rel_tol=1e-5)


# --- refusals -------------------------------------------------------------------------------

IMAGE_MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "what is this"},
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "x", "suffix": "and so on"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": [1, 500_000]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": IMAGE_MESSAGES}, "messages[0].content[1]"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": 5}, "stop"),
    ("/v1/embeddings", {"input": "x", "dimensions": 100_000}, "dimensions"),
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": "x", "stream": True}, "stream"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream_interval": 0}, "stream_interval"),
    ("/v1/completions", {"prompt": "x", "stream_interval": "4"}, "stream_interval"),
])
@pytest.mark.parametrize("fixture", ["instant", "timed"])
def test_refusals_name_the_parameter(fixture: str, path: str, body: dict[str, Any], param: str,
                                     request: pytest.FixtureRequest) -> None:
    model, url = request.getfixturevalue(fixture)
    response = httpx.post(f"{url}{path}", json={"model": model.model_id, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("BadRequestError", param)


def test_completions_client_disconnect_aborts_the_sequence(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    max_tokens = 8000
    before = metrics(url)["vllm:generation_tokens_total"]
    stream = client(url).completions.create(model=model.model_id, prompt="go on", n=2,
                                            max_tokens=max_tokens, stream=True)
    next(iter(stream))
    next(iter(stream))
    stream.close()
    samples = wait_until_idle(url)
    assert samples["vllm:num_requests_running"] == 0
    assert samples["vllm:kv_cache_usage_perc"] == 0
    assert samples["vllm:generation_tokens_total"] - before < max_tokens
