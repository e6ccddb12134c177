"""Chat and completions through the gateway to vLLM, whole and streamed: every
answer valid against OpenAI's schemas, the text vLLM's own, the usage as vLLM
counted it (and billed so), `service_tier` the tier served; token-id prompts,
vLLM's `/tokenize`, and its prefix cache seen through usage and metrics."""

from __future__ import annotations

import uuid

import httpx
import pytest

from conftest import Gateway, billed, usage_rows, wait_for
from openapi import validate

from .support import (
    EXACT,
    KV_BLOCK_SIZE,
    MAX_MODEL_LEN,
    VllmServer,
    direct,
    sse_chunks,
    tokenize,
    validate_completion_chunk,
)

MESSAGES = [{"role": "user", "content": "Name three rivers of France."}]


# --- chat --------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["default", "flex"])
def test_chat_whole(gateway: Gateway, vllm: VllmServer, tier: str) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model=vllm.model, messages=MESSAGES, max_tokens=12, service_tier=tier,  # type: ignore[arg-type]
        extra_body=EXACT,
    )
    body = raw.http_response.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["service_tier"] == tier
    assert body["model"] == vllm.model
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length"
    mine = direct(vllm, "/v1/chat/completions", messages=MESSAGES, max_tokens=12, **EXACT)
    assert choice["message"]["content"] == mine["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenize(vllm, messages=MESSAGES)) == mine["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    row = billed(gateway, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], 12)
    assert (row["served_tier"], row["status"]) == (tier, "completed")


@pytest.mark.parametrize("tier", ["default", "flex"])
def test_chat_streamed(gateway: Gateway, vllm: VllmServer, tier: str) -> None:
    body = {"model": vllm.model, "messages": MESSAGES, "max_tokens": 12, "service_tier": tier,
            "stream": True, "stream_options": {"include_usage": True}, **EXACT}
    with gateway.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        request_id = response.headers["x-request-id"]
        chunks = sse_chunks(response)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["service_tier"] == tier
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert sum(1 for piece in pieces if piece) > 1  # relayed as it came, not as one piece
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["length"]
    mine = direct(vllm, "/v1/chat/completions", messages=MESSAGES, max_tokens=12, **EXACT)
    assert "".join(pieces) == mine["choices"][0]["message"]["content"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["prompt_tokens"] == mine["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == 12
    row = billed(gateway, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["served_tier"]) == (
        usage["prompt_tokens"], 12, tier)


def test_vllm_sends_a_stream_interval_in_chunks_of_that_many_tokens(vllm: VllmServer) -> None:
    """What `upstream_stream_interval` asks of vLLM for flex read whole (as
    the gateways here do, with 4): the first token at once, then 4 a chunk,
    the rest with the finish; the text its own. (Tokens are counted with
    logprobs, one entry each. vLLM merges the chunks a slow reader has not
    taken yet: four chunks at most.)"""
    body = {"model": vllm.model, "messages": MESSAGES, "max_tokens": 12, "stream": True,
            "stream_interval": 4, "logprobs": True, **EXACT}
    with httpx.stream("POST", f"{vllm.url}/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        chunks = [c for c in sse_chunks(response) if c["choices"]]
    tokens = [len((c["choices"][0].get("logprobs") or {}).get("content") or []) for c in chunks]
    sizes = [n for n in tokens if n]
    assert sum(sizes) == 12 and len(sizes) <= 4, tokens  # token by token: 12
    mine = direct(vllm, "/v1/chat/completions", messages=MESSAGES, max_tokens=12, **EXACT)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == mine["choices"][0]["message"]["content"]


def test_chat_logprobs_and_n(gateway: Gateway, vllm: VllmServer) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model=vllm.model, messages=MESSAGES, max_tokens=5, n=2, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    body = raw.http_response.json()
    validate(body, "CreateChatCompletionResponse")
    assert sorted(c["index"] for c in body["choices"]) == [0, 1]
    for choice in body["choices"]:
        entries = choice["logprobs"]["content"]
        assert len(entries) == 5
        for entry in entries:
            assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
    assert body["usage"]["completion_tokens"] == 10
    assert billed(gateway, raw.headers["x-request-id"])["completion_tokens"] == 10


# --- completions ---------------------------------------------------------------


@pytest.mark.parametrize("tier", ["default", "flex"])
def test_completion_whole_and_streamed(gateway: Gateway, vllm: VllmServer, tier: str) -> None:
    prompt = "The flex tier sells spare capacity"
    raw = gateway.client().completions.with_raw_response.create(
        model=vllm.model, prompt=prompt, max_tokens=10, extra_body={"service_tier": tier, **EXACT},
    )
    body = raw.http_response.json()
    validate(body, "CreateCompletionResponse")
    assert body["service_tier"] == tier
    mine = direct(vllm, "/v1/completions", prompt=prompt, max_tokens=10, **EXACT)
    assert body["choices"][0]["text"] == mine["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == len(tokenize(vllm, prompt=prompt))
    assert body["usage"]["completion_tokens"] == 10
    row = billed(gateway, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["served_tier"]) == (
        body["usage"]["prompt_tokens"], 10, tier)

    stream = {"model": vllm.model, "prompt": prompt, "max_tokens": 10, "service_tier": tier,
              "stream": True, "stream_options": {"include_usage": True}, **EXACT}
    with gateway.http() as http, http.stream("POST", "/v1/completions", json=stream) as response:
        assert response.status_code == 200
        chunks = sse_chunks(response)
    for chunk in chunks:
        validate_completion_chunk(chunk)
        assert chunk["service_tier"] == tier
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == mine["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_token_id_prompts_are_vllms_tokens(gateway: Gateway, vllm: VllmServer) -> None:
    """`/tokenize` (vLLM's, called directly) gives ids that, sent as the prompt
    through the gateway, are the same prompt as the text."""
    texts = ["Once upon a time", "In a galaxy far away, there was"]
    ids = [tokenize(vllm, prompt=text) for text in texts]
    client = gateway.client()
    by_text = client.completions.with_raw_response.create(
        model=vllm.model, prompt=texts, max_tokens=6, extra_body=EXACT,
    ).http_response.json()
    raw = client.completions.with_raw_response.create(
        model=vllm.model, prompt=ids, max_tokens=6, extra_body=EXACT,
    )
    by_ids = raw.http_response.json()
    validate(by_ids, "CreateCompletionResponse")
    assert by_ids["usage"]["prompt_tokens"] == sum(len(i) for i in ids) == by_text["usage"]["prompt_tokens"]
    assert by_ids["usage"]["completion_tokens"] == 12
    texts_by_index = {c["index"]: c["text"] for c in by_text["choices"]}
    assert {c["index"]: c["text"] for c in by_ids["choices"]} == texts_by_index
    assert billed(gateway, raw.headers["x-request-id"])["prompt_tokens"] == sum(len(i) for i in ids)
    # One prompt of ids, as a flat list.
    single = client.completions.create(model=vllm.model, prompt=ids[0], max_tokens=6, extra_body=EXACT)
    assert single.usage is not None and single.usage.prompt_tokens == len(ids[0])
    assert single.choices[0].text == texts_by_index[0]


def test_engine_refusals_are_the_clients_400(gateway: Gateway, vllm: VllmServer) -> None:
    """What vLLM refuses comes back as OpenAI's 400, naming the parameter, unbilled."""
    with gateway.http() as http:
        too_long = http.post("/v1/completions", json={
            "model": vllm.model, "prompt": [5] * (MAX_MODEL_LEN + 1), "max_tokens": 1})
        out_of_vocabulary = http.post("/v1/completions", json={
            "model": vllm.model, "prompt": [5, 60000], "max_tokens": 1})
    for response in (too_long, out_of_vocabulary):
        assert response.status_code == 400, response.text
        validate(response.json(), "ErrorResponse")
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert usage_rows(gateway, response.headers["x-request-id"]) == []
    assert str(MAX_MODEL_LEN) in too_long.json()["error"]["message"]
    assert "60000" in out_of_vocabulary.json()["error"]["message"]


# --- prefix cache ----------------------------------------------------------------


def test_a_repeated_prefix_hits_vllms_cache_and_is_billed_as_cached(
    gateway: Gateway, vllm: VllmServer
) -> None:
    # Several of vLLM's KV blocks of a shared system prompt, then
    # different questions.
    # (A fresh nonce first: the cache outlives tests.)
    rules = " ".join(f"Rule {i}: answer briefly." for i in range(120))
    system = {"role": "system", "content": f"{uuid.uuid4()} {rules}"}
    first_messages = [system, {"role": "user", "content": "First question?"}]
    second_messages = [system, {"role": "user", "content": "Second question?"}]
    before = vllm.metrics()
    client = gateway.client()
    first = client.chat.completions.with_raw_response.create(
        model=vllm.model, messages=first_messages, max_tokens=2, extra_body=EXACT)  # type: ignore[arg-type]
    middle = vllm.metrics()
    second = client.chat.completions.with_raw_response.create(
        model=vllm.model, messages=second_messages, max_tokens=2, extra_body=EXACT)  # type: ignore[arg-type]
    prompt_tokens = len(tokenize(vllm, messages=second_messages))
    assert prompt_tokens > 4 * KV_BLOCK_SIZE

    def queried() -> float:
        return vllm.metrics()["vllm:prefix_cache_queries_total"] - middle["vllm:prefix_cache_queries_total"]

    # The counters may trail the answer by an engine step.
    wait_for(lambda: queried() >= prompt_tokens)
    after = vllm.metrics()
    assert queried() == prompt_tokens
    hits = after["vllm:prefix_cache_hits_total"] - middle["vllm:prefix_cache_hits_total"]
    assert 4 * KV_BLOCK_SIZE <= hits < prompt_tokens  # whole blocks of the shared prefix
    assert middle["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] < hits

    usage = second.http_response.json()["usage"]
    validate(second.http_response.json(), "CreateChatCompletionResponse")
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["prompt_tokens_details"]["cached_tokens"] == hits
    assert billed(gateway, second.headers["x-request-id"])["cached_tokens"] == hits
    assert billed(gateway, first.headers["x-request-id"])["cached_tokens"] < hits
