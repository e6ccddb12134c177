"""The sim server's answers in OpenAI's shapes, as vLLM writes them.

One class per endpoint turns the model's ``Delta``s into a whole response
(``whole``) or into server-sent events (``open``, ``chunk``, ``usage_chunk``):
chat completions (``n`` choices, ``message.tool_calls``, ``logprobs``; a role
chunk per choice opens a stream), text completions and embeddings. The
chat reply also writes a single plain-text choice directly (``whole_text``):
that is the ``instant`` profile's hot path, measured as a gateway's yardstick.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from flexserve.engines.base import Delta, Usage

__all__ = ["Assembled", "ChatReply", "CompletionReply", "EmbeddingReply"]

DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class _Choice:
    texts: list[str] = field(default_factory=list)
    # The choice's one tool call, its argument pieces joined as they come.
    tool_call: dict[str, Any] | None = None
    # Chat: the token entries; completions: the four parallel lists.
    logprob_tokens: list[Any] | None = None
    logprob_lists: dict[str, list[Any]] | None = None
    finish_reason: str | None = None


class Assembled:
    """Deltas put back together per choice, for a whole (non-streamed) answer."""

    __slots__ = ("choices", "data", "usage")

    def __init__(self) -> None:
        self.choices: dict[int, _Choice] = {}
        self.usage = Usage(0, 0)
        # Embeddings: the embedding objects.
        self.data: list[dict[str, Any]] = []

    def add(self, delta: Delta) -> None:
        if delta.usage is not None:
            self.usage = delta.usage
        if delta.data is not None:
            self.data.extend(delta.data)
            return
        choice = self.choices.get(delta.index)
        if choice is None:
            choice = self.choices[delta.index] = _Choice()
        if delta.text:
            choice.texts.append(delta.text)
        for piece in delta.tool_calls or ():
            function = piece.get("function") or {}
            if choice.tool_call is None:
                choice.tool_call = {"id": piece.get("id", ""), "type": "function",
                                    "function": {"name": function.get("name", ""),
                                                 "arguments": ""}}
            choice.tool_call["function"]["arguments"] += function.get("arguments") or ""
        logprobs = delta.logprobs
        if logprobs is not None:
            if "tokens" in logprobs:
                lists = choice.logprob_lists = choice.logprob_lists or {}
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    lists.setdefault(name, []).extend(logprobs[name])
            else:
                if choice.logprob_tokens is None:
                    choice.logprob_tokens = []
                choice.logprob_tokens.extend(logprobs["content"])
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason

    def __iter__(self) -> Any:
        return iter(sorted(self.choices.items()))


class _Reply:
    __slots__ = ("created", "model_id", "reply_id")

    def __init__(self, model_id: str, reply_id: str) -> None:
        self.model_id = model_id
        self.reply_id = reply_id
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.reply_id, "object": obj, "created": self.created,
                "model": self.model_id}

    def _event(self, obj: str, choices: list[dict[str, Any]]) -> bytes:
        body = self._head(obj)
        body["choices"] = choices
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _usage_event(self, obj: str, usage: Usage) -> bytes:
        body = self._head(obj)
        body["choices"] = []
        body["usage"] = usage_dict(usage)
        return b"data: " + orjson.dumps(body) + b"\n\n"


class ChatReply(_Reply):
    """`chat.completion` and `chat.completion.chunk`."""

    __slots__ = ("num_choices",)

    def __init__(self, model_id: str, reply_id: str, num_choices: int = 1) -> None:
        super().__init__(model_id, reply_id)
        self.num_choices = num_choices

    def whole_text(self, text: str, finish_reason: str, usage: Usage) -> bytes:
        """One plain-text choice: the common answer, written without assembling."""
        body = self._head("chat.completion")
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text,
                                                    "refusal": None},
                            "logprobs": None, "finish_reason": finish_reason}]
        body["usage"] = usage_dict(usage)
        return orjson.dumps(body)

    def whole(self, assembled: Assembled) -> bytes:
        choices = []
        for index, choice in assembled:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(choice.texts),
                                       "refusal": None}
            if choice.tool_call is not None:
                message["tool_calls"] = [choice.tool_call]
                if not choice.texts:
                    message["content"] = None
            logprobs = None
            if choice.logprob_tokens is not None:
                logprobs = {"content": choice.logprob_tokens, "refusal": None}
            choices.append({"index": index, "message": message, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason or "stop"})
        body = self._head("chat.completion")
        body["choices"] = choices
        body["usage"] = usage_dict(assembled.usage)
        return orjson.dumps(body)

    def open(self) -> bytes:
        """The role first, for every choice."""
        return b"".join(
            self._event("chat.completion.chunk", [{
                "index": index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None,
            }])
            for index in range(self.num_choices)
        )

    def text_chunk(self, text: str, finish_reason: str | None) -> bytes:
        return self._event("chat.completion.chunk", [{
            "index": 0, "delta": {"content": text}, "logprobs": None,
            "finish_reason": finish_reason,
        }])

    def chunk(self, delta: Delta) -> bytes:
        message: dict[str, Any] = {}
        if delta.tool_calls:
            message["tool_calls"] = delta.tool_calls
        if delta.text or not delta.tool_calls:
            message["content"] = delta.text
        logprobs = None
        if delta.logprobs is not None:
            logprobs = {"content": delta.logprobs["content"], "refusal": None}
        return self._event("chat.completion.chunk", [{
            "index": delta.index, "delta": message, "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        }])

    def usage_chunk(self, usage: Usage) -> bytes:
        return self._usage_event("chat.completion.chunk", usage)


class CompletionReply(_Reply):
    """`text_completion`, whole or as stream chunks (the same shape)."""

    __slots__ = ()

    def whole(self, assembled: Assembled) -> bytes:
        choices = []
        for index, choice in assembled:
            lists = choice.logprob_lists
            choices.append({"index": index, "text": "".join(choice.texts),
                            "logprobs": lists, "finish_reason": choice.finish_reason or "stop"})
        body = self._head("text_completion")
        body["choices"] = choices
        body["usage"] = usage_dict(assembled.usage)
        return orjson.dumps(body)

    def open(self) -> bytes:
        return b""

    def chunk(self, delta: Delta) -> bytes:
        return self._event("text_completion", [{
            "index": delta.index, "text": delta.text, "logprobs": delta.logprobs,
            "finish_reason": delta.finish_reason,
        }])

    def usage_chunk(self, usage: Usage) -> bytes:
        return self._usage_event("text_completion", usage)


class EmbeddingReply(_Reply):
    """The `list` of embedding objects; never streamed."""

    __slots__ = ()

    def whole(self, assembled: Assembled) -> bytes:
        body = self._head("list")
        body["data"] = sorted(assembled.data, key=lambda item: int(item["index"]))
        usage = assembled.usage
        body["usage"] = {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens}
        return orjson.dumps(body)


def usage_dict(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens,
                           "completion_tokens": usage.completion_tokens,
                           "total_tokens": usage.total_tokens}
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return out
