"""An upstream's answers turned into Deltas: OpenAI's stream chunks and whole bodies.

Relaying is translation, not interpretation. Each choice's text, tool-call
pieces (under their own `index`), log probabilities, the other members of its
delta or message (`reasoning_content`, `refusal`…) and its finish reason pass
on as the upstream wrote them, so that whatever the engine can do reaches the
client. Only usage is read, for billing; an upstream that reports none gets
the estimate the API layer would make.

Output that does not parse as OpenAI's shapes is the upstream's fault, so it
becomes an ``EngineError`` (502), never a gateway bug.

Every stream chunk passes through ``relay_sse``: the plain text path is one
JSON parse per chunk and a few dict lookups per choice, and a finishing delta
is held until the stream ends so that it also carries the usage (one delta
fewer for the caller, and the contract's "totals on the last delta").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from flexserve.engines.base import Delta, EngineOp, EngineRequest, Usage
from flexserve.engines.upstream.silence import SilenceWatch
from flexserve.errors import EngineError

# Members of a chat delta or message that a Delta holds in fields of its own;
# `role` is the API's to write.
_OWN_MEMBERS = frozenset({"role", "content", "tool_calls"})
_NO_MEMBERS: dict[str, Any] = {}


class _Malformed(Exception):
    """Internal: a chunk or body that is not in OpenAI's shape."""


# What reading a chunk or body that is not in OpenAI's shape raises (a JSON
# parse error is a ValueError).
_MALFORMED = (_Malformed, AttributeError, LookupError, TypeError, ValueError)


def _check_shapes(text: Any, index: Any, tool_calls: Any, logprobs: Any) -> None:
    """What the API layer will read of a delta is of the types it expects."""
    if type(text) is not str or type(index) is not int:
        raise _Malformed
    if logprobs is not None and type(logprobs) is not dict:
        raise _Malformed
    if tool_calls is not None and not (
        type(tool_calls) is list and all(type(call) is dict for call in tool_calls)
    ):
        raise _Malformed


def _other_members(member: dict[str, Any]) -> dict[str, Any] | None:
    """What a delta or message says besides role, content and tool calls; null
    and empty members carry nothing and are left out."""
    fields = {k: v for k, v in member.items() if k not in _OWN_MEMBERS and v is not None and v != ""}
    return fields or None


def _without_nulls(calls: list[Any]) -> list[Any]:
    """Tool-call pieces without null members: vLLM streams `"name": null` in
    the pieces after a call's first, where OpenAI leaves the member out (and
    its schema wants a string when present)."""
    cleaned = []
    for call in calls:
        function = call.get("function")
        if type(function) is dict and None in function.values():
            call = {**call, "function": {k: v for k, v in function.items() if v is not None}}
        if None in call.values():
            call = {k: v for k, v in call.items() if v is not None}
        cleaned.append(call)
    return cleaned


def _usage(usage: Any) -> Usage:
    details = usage.get("prompt_tokens_details")
    cached = int(details.get("cached_tokens") or 0) if details else 0
    return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), cached)


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


# --- streams ----------------------------------------------------------------


def _chat_piece(choice: Any) -> Delta | None:
    """One choice of a `chat.completion.chunk`; None when it carries nothing."""
    delta = choice.get("delta") or _NO_MEMBERS
    text = delta.get("content") or ""
    logprobs = choice.get("logprobs")
    index = choice.get("index", 0)
    if text and logprobs is None and len(delta) == 1:
        # The usual chunk: a piece of text and nothing else.
        if type(text) is not str or type(index) is not int:
            raise _Malformed
        return Delta(text, choice.get("finish_reason") or None, None, index)
    tool_calls = delta.get("tool_calls") or None
    fields = None if _OWN_MEMBERS.issuperset(delta) else _other_members(delta)
    finish_reason = choice.get("finish_reason") or None
    if not (text or tool_calls or fields or finish_reason or logprobs is not None):
        return None
    _check_shapes(text, index, tool_calls, logprobs)
    if tool_calls is not None:
        tool_calls = _without_nulls(tool_calls)
    return Delta(text, finish_reason, None, index, tool_calls, logprobs, fields)


def _text_piece(choice: Any) -> Delta | None:
    """One choice of a streamed `text_completion`; None when it carries nothing."""
    text = choice.get("text") or ""
    logprobs = choice.get("logprobs")
    finish_reason = choice.get("finish_reason") or None
    if not (text or finish_reason or logprobs is not None):
        return None
    index = choice.get("index", 0)
    _check_shapes(text, index, None, logprobs)
    return Delta(text, finish_reason, None, index, None, logprobs)


async def _sse_lines(
    response: aiohttp.ClientResponse, silence: SilenceWatch | None = None
) -> AsyncIterator[list[bytes]]:
    """The body's lines, in batches: those each read completed.

    Split out of whatever the socket delivered rather than awaited one by one,
    so that an answer arriving in one read costs one await, not one per line.
    ``silence``, when given, is told when each read begins and ends.
    """
    pending = b""
    async for block in response.content.iter_any():
        if silence is not None:
            silence.heard()
        *lines, pending = (pending + block).split(b"\n")
        if lines:
            yield lines
        if silence is not None:
            silence.waiting()
    if pending:
        yield [pending]


async def relay_sse(
    name: str, response: aiohttp.ClientResponse, op: EngineOp = "chat",
    silence: SilenceWatch | None = None,
) -> AsyncIterator[Delta]:
    """An OpenAI stream (chat or completions chunks) as Deltas, every choice
    relayed under its own index, the usage on the last. ``name`` is how the
    error messages, which clients read, call the upstream."""
    piece: Callable[[Any], Delta | None] = _chat_piece if op == "chat" else _text_piece
    usage: Usage | None = None
    # The newest delta that finished its choice, held back to carry the usage.
    held: Delta | None = None
    num_finished = 0
    num_output = 0
    done = False
    async for lines in _sse_lines(response, silence):
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            try:
                chunk = orjson.loads(data)
                if "error" in chunk:
                    raise EngineError(f"{name} failed mid-stream: {_error_message(chunk['error'])}")
                reported = chunk.get("usage")
                if reported:
                    usage = _usage(reported)
                choices = chunk.get("choices")
                if choices and type(choices) is not list:
                    raise _Malformed
            except _MALFORMED as exc:
                raise EngineError(f"{name} sent a malformed stream chunk.") from exc
            if not choices:
                continue
            for choice in choices:
                try:
                    delta = piece(choice)
                except _MALFORMED as exc:
                    raise EngineError(f"{name} sent a malformed stream chunk.") from exc
                if delta is None:
                    continue
                if held is not None:
                    yield held
                    held = None
                if delta.text or delta.tool_calls or delta.fields:  # has_output, without a call per chunk
                    num_output += 1
                if delta.finish_reason is None:
                    yield delta
                else:
                    num_finished += 1
                    held = delta
        if done:
            break
    if not num_finished:
        raise EngineError(f"{name} closed the stream before it finished.")
    if usage is None:
        # An upstream that reports no usage: one token per delta with output is
        # the best count available (prompt tokens unknown).
        usage = Usage(0, num_output)
    if held is None:
        # Another choice went on after the last one finished.
        held = Delta()
    held.usage = usage
    yield held


# --- whole answers --------------------------------------------------------------


def _chat_choice(choice: Any) -> Delta:
    """One choice of a `chat.completion`: its whole message as one delta."""
    message = choice.get("message") or _NO_MEMBERS
    text = message.get("content") or ""
    calls = message.get("tool_calls") or None
    index = choice.get("index", 0)
    logprobs = choice.get("logprobs")
    _check_shapes(text, index, calls, logprobs)
    if calls is not None:
        # A whole message's calls have no index: their position is it.
        calls = [{**call, "index": position} for position, call in enumerate(_without_nulls(calls))]
    return Delta(
        text, choice.get("finish_reason") or "stop", None, index, calls, logprobs,
        _other_members(message),
    )


def _text_choice(choice: Any) -> Delta:
    """One choice of a `text_completion`."""
    text = choice.get("text") or ""
    index = choice.get("index", 0)
    logprobs = choice.get("logprobs")
    _check_shapes(text, index, None, logprobs)
    return Delta(text, choice.get("finish_reason") or "stop", None, index, None, logprobs)


def _estimated_tokens(delta: Delta) -> int:
    """About four characters a token, as the API layer estimates prompts."""
    chars = len(delta.text)
    for call in delta.tool_calls or ():
        chars += len((call.get("function") or _NO_MEMBERS).get("arguments") or "")
    return (chars + 3) // 4


def _document(name: str, body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EngineError(f"{name} sent a malformed answer.") from exc
    if not isinstance(document, dict):
        raise EngineError(f"{name} sent a malformed answer.")
    if document.get("error") is not None:
        raise EngineError(f"{name} failed: {_error_message(document['error'])}")
    return document


def completion_deltas(name: str, body: bytes, op: EngineOp = "chat") -> list[Delta]:
    """A whole (non-streamed) chat completion or completion: one Delta per
    choice, the last with the usage."""
    document = _document(name, body)
    choice_delta = _chat_choice if op == "chat" else _text_choice
    try:
        deltas = [choice_delta(choice) for choice in document["choices"]]
        usage = _usage(document["usage"]) if document.get("usage") else None
    except _MALFORMED as exc:
        raise EngineError(f"{name} sent a malformed completion.") from exc
    if not deltas:
        raise EngineError(f"{name} sent a completion without choices.")
    if usage is None:
        # An upstream that reports no usage: prompt tokens unknown.
        usage = Usage(0, sum(_estimated_tokens(delta) for delta in deltas))
    deltas[-1].usage = usage
    return deltas


def embedding_delta(name: str, body: bytes, request: EngineRequest) -> Delta:
    """An embeddings answer: its `data` exactly as the upstream wrote it."""
    document = _document(name, body)
    try:
        data = document["data"]
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise _Malformed
        usage = document.get("usage")
        prompt_tokens = int(usage.get("prompt_tokens") or 0) if usage else _estimated_input_tokens(request)
    except _MALFORMED as exc:
        raise EngineError(f"{name} sent malformed embeddings.") from exc
    return Delta(finish_reason="stop", usage=Usage(prompt_tokens, 0), data=data)


def _estimated_input_tokens(request: EngineRequest) -> int:
    """For an upstream that reports no usage: about four characters a token of
    text inputs, one per token id."""
    value = request.body.get("input")
    items = value if isinstance(value, list) else [value]
    num_tokens = 0
    for item in items:
        if isinstance(item, str):
            num_tokens += (len(item) + 3) // 4
        elif isinstance(item, list):
            num_tokens += len(item)
        elif isinstance(item, int):
            num_tokens += 1
    return num_tokens
