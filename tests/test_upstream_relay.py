"""What an upstream generates reaches the client as it was generated: tool
calls, log probabilities, several choices, reasoning, cached prompt tokens,
completions and embeddings, streamed or whole.

The upstream is a small real server that answers as vLLM does (its JSON and
SSE written out here by hand), in front of a real gateway, read with the
official SDK."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conftest import Gateway, ServerThread, usage_rows, wait_for

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
PROMPT_TOKENS = 11
CACHED_TOKENS = 4
REASONING = ["Thinking", " hard."]
ARGUMENTS = ['{"city": ', '"Paris"}']


def content_pieces(index: int) -> list[str]:
    return ["Hello", " world", f" {index}"]


def text_pieces(index: int) -> list[str]:
    return [" one", " two", f" {index}"]


def vector(index: int) -> list[float]:
    return [0.5, -0.25, 0.125 * (index + 1)]


def _sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _usage(completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS + completion_tokens,
        "completion_tokens": completion_tokens, "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS},
    }


def _token_logprobs(piece: str) -> dict[str, Any]:
    entry = {"token": piece, "logprob": -0.25, "bytes": list(piece.encode())}
    return {"content": [{**entry, "top_logprobs": [entry]}]}


class VllmLike:
    """Answers chat, completions and embeddings in vLLM's shapes: tool calls
    when `tools` are given, reasoning for the model `vllm-reasoner`, log
    probabilities when asked, `n` choices; records each request's headers and body."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ])

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "vllm", "max_model_len": 4096}
            for model in ("vllm-chat", "vllm-reasoner")
        ]})

    async def _body(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = await request.json()
        self.requests.append((dict(request.headers), body))
        return body

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        n = body.get("n") or 1
        head = {"id": "chatcmpl-vllm", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        reasoning = REASONING if body["model"] == "vllm-reasoner" else []
        if body.get("tools"):
            # One call per choice: its id, type and name first, then the arguments in pieces.
            steps: list[list[dict[str, Any]]] = [
                [{"tool_calls": [{"id": f"chatcmpl-tool-{i}", "type": "function", "index": 0,
                                  "function": {"name": "get_weather", "arguments": ""}}]} for i in range(n)],
                # As vLLM writes the later pieces: a null id, type and name.
                *[[{"tool_calls": [{"id": None, "type": None, "index": 0,
                                    "function": {"name": None, "arguments": piece}}]} for _ in range(n)]
                  for piece in ARGUMENTS],
            ]
            finish = "tool_calls"
        else:
            steps = [[{"reasoning_content": piece} for _ in range(n)] for piece in reasoning]
            steps += [[{"content": content_pieces(i)[k]} for i in range(n)] for k in range(3)]
            finish = "stop"
        num_tokens = n * (len(steps) - (1 if body.get("tools") else 0))
        if not body.get("stream"):
            return JSONResponse(self._chat_completion(body, n, reasoning, finish, num_tokens))
        chunks = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None} for i in range(n)]}]
        for step in steps:
            for i, delta in enumerate(step):  # the choices interleaved, as they are generated
                content = delta.get("content")
                logprobs = _token_logprobs(content) if content and body.get("logprobs") else None
                chunks.append({**head, "choices": [
                    {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": None}
                ]})
        for i in range(n):
            chunks.append({**head, "choices": [{"index": i, "delta": {"content": ""}, "logprobs": None,
                                                "finish_reason": finish, "stop_reason": None}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**head, "choices": [], "usage": _usage(num_tokens)})
        return _sse(chunks)

    def _chat_completion(self, body: dict[str, Any], n: int, reasoning: list[str], finish: str,
                         num_tokens: int) -> dict[str, Any]:
        choices = []
        for i in range(n):
            tools = bool(body.get("tools"))
            message = {
                "role": "assistant",
                "reasoning_content": "".join(reasoning) or None,
                "content": None if tools else "".join(content_pieces(i)),
                "tool_calls": [{"id": f"chatcmpl-tool-{i}", "type": "function",
                                "function": {"name": "get_weather", "arguments": "".join(ARGUMENTS)}}]
                if tools else [],
            }
            logprobs = None
            if body.get("logprobs"):
                logprobs = {"content": [_token_logprobs(p)["content"][0] for p in content_pieces(i)]}
            choices.append({"index": i, "message": message, "logprobs": logprobs,
                            "finish_reason": finish, "stop_reason": None})
        return {"id": "chatcmpl-vllm", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": choices, "usage": {**_usage(num_tokens)}, "prompt_logprobs": None}

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        indices = range(len(prompts) * (body.get("n") or 1))
        want_logprobs = body.get("logprobs") is not None

        def logprobs(pieces: list[str]) -> dict[str, Any] | None:
            if not want_logprobs:
                return None
            return {"tokens": pieces, "token_logprobs": [-0.5] * len(pieces),
                    "top_logprobs": [{p: -0.5} for p in pieces],
                    "text_offset": [sum(len(q) for q in pieces[:k]) for k in range(len(pieces))]}

        head = {"id": "cmpl-vllm", "object": "text_completion", "created": 1, "model": body["model"]}
        num_tokens = 3 * len(indices)
        if not body.get("stream"):
            return JSONResponse({**head, "choices": [
                {"index": i, "text": "".join(text_pieces(i)), "logprobs": logprobs(text_pieces(i)),
                 "finish_reason": "length", "stop_reason": None, "prompt_logprobs": None}
                for i in indices
            ], "usage": _usage(num_tokens)})
        chunks = [
            {**head, "choices": [{"index": i, "text": piece, "logprobs": logprobs([piece]),
                                  "finish_reason": "length" if k == 2 else None, "stop_reason": None}],
             "usage": None}
            for k in range(3) for i in indices for piece in [text_pieces(i)[k]]
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**head, "choices": [], "usage": _usage(num_tokens)})
        return _sse(chunks)

    async def embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for i in range(len(inputs)):
            embedding: list[float] | str = vector(i)
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack("<3f", *vector(i))).decode()
            data.append({"index": i, "object": "embedding", "embedding": embedding})
        return JSONResponse({"id": "embd-vllm", "object": "list", "created": 1, "model": body["model"],
                             "data": data, "usage": {"prompt_tokens": 6, "total_tokens": 6,
                                                     "completion_tokens": 0, "prompt_tokens_details": None}})


@pytest.fixture(scope="module")
def vllm() -> Iterator[tuple[VllmLike, ServerThread]]:
    upstream = VllmLike()
    with ServerThread(upstream.app()) as server:
        yield upstream, server


@pytest.fixture(scope="module")
def gateway(start_gateway: Callable[..., Gateway], vllm: tuple[VllmLike, ServerThread]) -> Gateway:
    return start_gateway(engine="upstream", upstreams=[vllm[1].url])


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    return gateway.client()


@pytest.mark.parametrize("tier", ["default", "flex"])
def test_streamed_tool_calls_arrive_piece_by_piece(client: openai.OpenAI, tier: str) -> None:
    chunks = list(client.chat.completions.create(
        model="vllm-chat", messages=MESSAGES, tools=TOOLS, stream=True, service_tier=tier,  # type: ignore[arg-type]
    ))
    pieces = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
    assert [p.index for p in pieces] == [0, 0, 0]
    assert (pieces[0].id, pieces[0].type) == ("chatcmpl-tool-0", "function")
    assert pieces[0].function is not None and pieces[0].function.name == "get_weather"
    assert [p.function.arguments for p in pieces if p.function] == ["", *ARGUMENTS]
    # The later pieces' null members are left out, as OpenAI writes them.
    assert all(p.model_fields_set == {"index", "function"} for p in pieces[1:])
    assert all(p.function is not None and p.function.model_fields_set == {"arguments"} for p in pieces[1:])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]


@pytest.mark.parametrize("tier", ["default", "flex"])
def test_whole_tool_calls(client: openai.OpenAI, tier: str) -> None:
    completion = client.chat.completions.create(
        model="vllm-chat", messages=MESSAGES, tools=TOOLS, service_tier=tier,  # type: ignore[arg-type]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id == "chatcmpl-tool-0" and call.type == "function"
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Paris"}'


def test_streamed_logprobs_reasoning_and_several_choices(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="vllm-reasoner", messages=MESSAGES, n=2, logprobs=True, top_logprobs=1, stream=True,
        stream_options={"include_usage": True},
    ))
    texts: dict[int, str] = {0: "", 1: ""}
    reasoning: dict[int, str] = {0: "", 1: ""}
    tokens: dict[int, list[str]] = {0: [], 1: []}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasoning[choice.index] += getattr(choice.delta, "reasoning_content", None) or ""
            if choice.logprobs is not None:
                tokens[choice.index] += [entry.token for entry in choice.logprobs.content or ()]
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    for i in (0, 1):
        assert texts[i] == "".join(content_pieces(i))
        assert reasoning[i] == "".join(REASONING)
        assert tokens[i] == content_pieces(i)
    assert finishes == {0: "stop", 1: "stop"}
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == PROMPT_TOKENS
    assert usage.completion_tokens == 2 * (len(REASONING) + 3)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == CACHED_TOKENS


def test_whole_logprobs_reasoning_and_several_choices(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="vllm-reasoner", messages=MESSAGES, n=2, logprobs=True, top_logprobs=1,
    )
    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.message.content == "".join(content_pieces(choice.index))
        assert getattr(choice.message, "reasoning_content", None) == "".join(REASONING)
        assert choice.logprobs is not None
        assert [entry.token for entry in choice.logprobs.content or ()] == content_pieces(choice.index)
        assert choice.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == CACHED_TOKENS


def test_request_id_sent_upstream_and_cached_tokens_billed(
    gateway: Gateway, client: openai.OpenAI, vllm: tuple[VllmLike, ServerThread]
) -> None:
    raw = client.chat.completions.with_raw_response.create(model="vllm-chat", messages=MESSAGES)
    request_id = raw.headers["x-request-id"]
    assert request_id.startswith("req_")
    headers, body = vllm[0].requests[-1]
    assert headers["x-request-id"] == request_id
    assert body["messages"] == MESSAGES and body["stream"] is False
    wait_for(lambda: len(usage_rows(gateway, request_id)) == 1)
    (row,) = usage_rows(gateway, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
        PROMPT_TOKENS, 3, CACHED_TOKENS
    )


@pytest.mark.parametrize("stream", [False, True])
def test_completions_with_logprobs_and_several_prompts(client: openai.OpenAI, stream: bool) -> None:
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    finishes: dict[int, str] = {}
    if stream:
        responses = list(client.completions.create(
            model="vllm-chat", prompt=["a", "b"], max_tokens=3, logprobs=1, stream=True,
        ))
    else:
        responses = [client.completions.create(model="vllm-chat", prompt=["a", "b"], max_tokens=3, logprobs=1)]
    for response in responses:
        for choice in response.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.logprobs is not None:
                tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens or ())
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {i: "".join(text_pieces(i)) for i in (0, 1)}
    assert tokens == {i: text_pieces(i) for i in (0, 1)}
    assert finishes == {0: "length", 1: "length"}


@pytest.mark.parametrize("tier", ["default", "flex"])
def test_embeddings_as_the_upstream_returned_them(
    gateway: Gateway, client: openai.OpenAI, vllm: tuple[VllmLike, ServerThread], tier: str
) -> None:
    # The SDK asks for base64 and decodes it: the vectors come back only if
    # the upstream's strings reached it untouched.
    raw = client.embeddings.with_raw_response.create(
        model="vllm-chat", input=["first", "second"], extra_body={"service_tier": tier}
    )
    result = raw.parse()
    assert vllm[0].requests[-1][1]["encoding_format"] == "base64"
    assert [item.embedding for item in result.data] == [vector(0), vector(1)]
    assert result.usage.prompt_tokens == 6
    floats = client.embeddings.create(model="vllm-chat", input="first", encoding_format="float")
    assert floats.data[0].embedding == vector(0)
    request_id = raw.headers["x-request-id"]
    wait_for(lambda: len(usage_rows(gateway, request_id)) == 1)
    (row,) = usage_rows(gateway, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["served_tier"]) == (6, 0, tier)
