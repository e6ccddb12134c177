"""End to end on the real embedded model: SmolLM2-135M through llama.cpp,
behind a real gateway on loopback, called with the official openai SDK."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable

import jsonschema
import openai
import pytest

from conftest import Gateway, usage_rows, wait_for
from openapi import validate

pytestmark = pytest.mark.embedded

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def embedded_gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    from flexserve.engines.embedded import EmbeddedEngine

    # One decode at a time makes the contention (and so the pausing) certain.
    engine = EmbeddedEngine(num_slots=3, max_decoding=1, n_ctx=1024)
    return start_gateway(engines=[engine], engine="embedded", flex_headroom=0.34)


def test_real_completion_on_flex(embedded_gateway: Gateway) -> None:
    raw = embedded_gateway.client().chat.completions.with_raw_response.create(
        model=MODEL, service_tier="flex", max_tokens=24, temperature=0.0,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    completion = raw.parse()
    validate(raw.http_response.json(), "CreateChatCompletionResponse")
    assert completion.service_tier == "flex"
    assert completion.model == MODEL
    assert (completion.choices[0].message.content or "").strip()  # SmolLM2's own words
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 24
    assert completion.usage.prompt_tokens > 5


async def test_async_stream_real_tokens(embedded_gateway: Gateway) -> None:
    client = embedded_gateway.async_client()
    stream = await client.chat.completions.create(
        model=MODEL, max_tokens=12, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
        # Greedy, and a prompt whose answer runs far past 12 tokens: sampled, a
        # short answer could reach end-of-text first (CI once stopped at 7).
        messages=[{"role": "user", "content": "Write a long story about a brave knight and a dragon."}],
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert all(c.service_tier == "default" for c in chunks)


def test_flex_stream_paused_by_default_completes_and_is_recorded_once(embedded_gateway: Gateway) -> None:
    client = embedded_gateway.client()
    flex_result: dict[str, object] = {}
    decoding = threading.Event()

    def flex_stream() -> None:
        stream = client.chat.completions.with_raw_response.create(
            model=MODEL, service_tier="flex", max_tokens=40, temperature=0.0, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Write a short story about a lighthouse."}],
        )
        flex_result["request_id"] = stream.headers["x-request-id"]
        chunks = []
        for chunk in stream.parse():
            chunks.append(chunk)
            if len(chunks) == 3:
                decoding.set()  # about 37 tokens (a second or more) still to go
        decoding.set()
        flex_result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        flex_result["usage"] = chunks[-1].usage
        flex_result["tiers"] = {c.service_tier for c in chunks}

    def flex_stream_or_error() -> None:
        try:
            flex_stream()
        except BaseException as exc:  # reported by the assertion below
            flex_result["error"] = exc
            decoding.set()

    thread = threading.Thread(target=flex_stream_or_error)
    thread.start()
    assert decoding.wait(timeout=120)
    default = client.chat.completions.create(
        model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "Say hi."}]
    )
    thread.join(timeout=240)  # under the suite's 300 s per-test timeout
    assert not thread.is_alive(), "the flex stream did not finish"
    assert "error" not in flex_result, flex_result.get("error")
    assert default.service_tier == "default"
    assert flex_result["tiers"] == {"flex"}
    assert str(flex_result["text"]).strip()
    usage = flex_result["usage"]
    assert usage is not None and usage.completion_tokens == 40  # type: ignore[attr-defined]
    with embedded_gateway.http() as http:
        metrics = http.get("/metrics").text
    pauses = [line for line in metrics.splitlines() if line.startswith("flexserve_flex_pauses_total")]
    assert pauses and float(pauses[0].split()[-1]) >= 1.0
    request_id = str(flex_result["request_id"])
    wait_for(lambda: len(usage_rows(embedded_gateway, request_id)) == 1)
    (row,) = usage_rows(embedded_gateway, request_id)
    assert row["served_tier"] == "flex" and row["status"] == "completed"
    assert row["completion_tokens"] == 40


PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_structured_output_through_the_sdk_validates(embedded_gateway: Gateway) -> None:
    raw = embedded_gateway.client().chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=60, temperature=0.0,
        messages=[{"role": "user", "content": "Describe a person as JSON with name and age."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        },
        logprobs=True, top_logprobs=2,
    )
    completion = raw.parse()
    validate(raw.http_response.json(), "CreateChatCompletionResponse")
    choice = completion.choices[0]
    jsonschema.validate(json.loads(choice.message.content or ""), PERSON_SCHEMA)
    assert choice.finish_reason == "stop"
    assert choice.logprobs is not None and choice.logprobs.content
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content


def test_embeddings_through_the_sdk(embedded_gateway: Gateway) -> None:
    # The SDK asks for base64 and decodes it itself.
    response = embedded_gateway.client().embeddings.create(
        model=MODEL, input=["The cat sat on the mat.", "A dog slept by the fire."]
    )
    assert [item.index for item in response.data] == [0, 1]
    for item in response.data:
        assert len(item.embedding) == 576
        assert math.isclose(math.sqrt(sum(x * x for x in item.embedding)), 1.0, abs_tol=1e-5)
    assert response.usage.prompt_tokens == response.usage.total_tokens > 10


def test_completions_through_the_sdk(embedded_gateway: Gateway) -> None:
    client = embedded_gateway.client()
    prompt = "The capital of France is"
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0, logprobs=1,
    )
    completion = raw.parse()
    validate(raw.http_response.json(), "CreateCompletionResponse")
    choice = completion.choices[0]
    assert choice.text.startswith(" Paris")
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens) == choice.text
    assert completion.usage is not None and completion.usage.completion_tokens == 4

    # How evaluation harnesses score a text: echo, logprobs, no new tokens.
    # (The first token's null logprob is what OpenAI sends, though its
    # published schema does not allow it.)
    scored = client.completions.create(
        model=MODEL, prompt=prompt + " Paris", max_tokens=0, echo=True, logprobs=1,
    )
    logprobs = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt + " Paris"
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert logprobs.tokens[-1] == " Paris"
    assert logprobs.token_logprobs[0] is None
    assert logprobs.token_logprobs[-1] == pytest.approx(choice.logprobs.token_logprobs[0], abs=1e-3)


def test_tools_are_refused_naming_the_field(embedded_gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        embedded_gateway.client().chat.completions.create(
            model=MODEL, max_tokens=8,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[{
                "type": "function",
                "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
            }],
        )
    error = raised.value.body
    assert isinstance(error, dict) and error.get("param") == "tools"


def test_batch_workflow_on_the_real_model(embedded_gateway: Gateway) -> None:
    """The SDK's Batch workflow on SmolLM2: files.create → batches.create →
    poll → files.content, every line answered by the model, matched by
    custom_id and billed once on the batch tier."""
    import io
    import time

    client = embedded_gateway.client()
    questions = ["What is the capital of France?", "Name a color.", "Count to three."]
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "max_tokens": 8, "temperature": 0.0,
                  "messages": [{"role": "user", "content": question}]}}
        for i, question in enumerate(questions)
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("eval.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None and batch.error_file_id is None
    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == ["q0", "q1", "q2"]
    for item in output:
        body = item["response"]["body"]
        validate(body, "CreateChatCompletionResponse")
        assert (body["choices"][0]["message"]["content"] or "").strip()  # the model's own words
        assert 0 < body["usage"]["completion_tokens"] <= 8
        rows = usage_rows(embedded_gateway, item["response"]["request_id"])
        assert [(r["served_tier"], r["completion_tokens"]) for r in rows] == [
            ("batch", body["usage"]["completion_tokens"])]
