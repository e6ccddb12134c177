"""`POST /v1/chat/completions`: OpenAI's chat completions, everything the
engine can do passed through (tools, structured outputs, logprobs, `n`,
penalties, content parts), streamed or not, `service_tier` in and out.

Most of a gateway's traffic is this endpoint, so its stream chunks are
built from a head serialised once per call.
"""

from __future__ import annotations

from typing import Any

import orjson

from flexserve.api.endpoints.choices import Choices
from flexserve.api.inference import Call, Endpoint, Inference, Output
from flexserve.api.schemas import convert
from flexserve.api.schemas.chat import (
    KNOWN_FIELDS,
    ChatCompletionRequest,
    features_needed,
    text_chars,
)
from flexserve.api.errors import error_parts
from flexserve.config import Settings
from flexserve.engines.base import Delta, EngineRequest, Usage
from flexserve.errors import InvalidRequestError
from flexserve.tiers import REQUESTABLE_TIERS

CHAT_PATH = "/v1/chat/completions"
# Fields the gateway answers itself: never sent to an engine as the client sent them.
GATEWAY_FIELDS = frozenset({"service_tier", "stream", "stream_options"})
DONE = b"data: [DONE]\n\n"


def check_service_tier(value: str | None) -> None:
    if value is not None and value not in REQUESTABLE_TIERS:
        raise InvalidRequestError(
            f"Invalid value for 'service_tier': {value!r}. Supported values are: "
            + ", ".join(repr(t) for t in REQUESTABLE_TIERS) + ".",
            param="service_tier",
            code="invalid_value",
        )


def check_max_tokens(name: str, value: int | None, limit: int) -> None:
    if value is not None and value > limit:
        raise InvalidRequestError(
            f"Invalid '{name}': {value}. It must be between 1 and {limit}.",
            param=name,
            code="integer_above_max_value",
        )


def check_stream_options(stream: bool | None, stream_options: object) -> None:
    if stream_options is not None and not stream:
        raise InvalidRequestError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
            code="invalid_value",
        )


def engine_body(body: dict[str, Any]) -> dict[str, Any]:
    """The client's body less the fields the gateway answers itself."""
    if GATEWAY_FIELDS.isdisjoint(body):
        return body
    return {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


class ChatCompletions(Endpoint):
    path = CHAT_PATH

    def parse(self, body: Any, request_id: str, settings: Settings) -> Inference:
        request = convert(body, ChatCompletionRequest)
        if len(request.messages) > settings.max_messages:
            raise InvalidRequestError(
                f"Invalid 'messages': {len(request.messages)} messages, more than the "
                f"{settings.max_messages} allowed.",
                param="messages",
                code="array_above_max_length",
            )
        check_max_tokens("max_tokens", request.max_tokens, settings.max_completion_tokens)
        check_max_tokens(
            "max_completion_tokens", request.max_completion_tokens, settings.max_completion_tokens
        )
        check_stream_options(request.stream, request.stream_options)
        check_service_tier(request.service_tier)
        if request.top_logprobs and not request.logprobs:
            raise InvalidRequestError(
                "Invalid 'top_logprobs': it can only be set when 'logprobs' is true.",
                param="top_logprobs",
                code="invalid_value",
            )
        chars, num_bytes = text_chars(request)
        num_messages = len(request.messages)
        # The newer limit wins, as OpenAI's API has it.
        limit = (
            request.max_completion_tokens
            if request.max_completion_tokens is not None
            else request.max_tokens
        )
        unknown = [name for name in body if name not in KNOWN_FIELDS]
        options = request.stream_options
        return Inference(
            engine=EngineRequest(request_id, request.model, engine_body(body), "chat"),
            service_tier=request.service_tier,
            stream=bool(request.stream),
            # About four characters a token, and a few tokens of template per message.
            prompt_tokens=chars // 4 + 4 * num_messages,
            # At most a token per byte, plus a chat template's few per message.
            prompt_token_bound=num_bytes + 8 * num_messages + 8,
            max_output_tokens=limit,
            num_choices=request.n or 1,
            include_usage=bool(options is not None and options.include_usage),
            needs=features_needed(request),
            unknown_fields=unknown,
            user=request.user,
        )

    def output(self, call: Call) -> Output:
        return ChatOutput(call)


class ChunkedOutput(Output):
    """What chat completions and completions answer alike: the choices
    collected for a whole answer, and stream chunks that share one head
    (`id`, `object`, `created`, `model`, `service_tier`), with the usage chunk
    and `[DONE]` last."""

    __slots__ = ("_call", "_choices", "_head", "_id", "_object", "_usage_null")

    def __init__(self, call: Call, id_prefix: str, object_: str, chunk_object: str) -> None:
        self._call = call
        self._choices = Choices()
        self._id = id_prefix + call.request_id[4:]
        self._object = object_
        head = {
            "id": self._id,
            "object": chunk_object,
            "created": call.created,
            "model": call.model,
            "service_tier": call.served_tier.value,
        }
        # Everything up to the choices, without the closing brace.
        self._head = b"data: " + orjson.dumps(head)[:-1]
        self._usage_null = b',"usage":null' if call.inference.include_usage else b""

    def collect(self, delta: Delta) -> None:
        self._choices.add(delta)

    def _document(self, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
        call = self._call
        return {
            "id": self._id,
            "object": self._object,
            "created": call.created,
            "model": call.model,
            "service_tier": call.served_tier.value,
            "choices": choices,
            "usage": usage_dict(usage),
        }

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        return self._head + b',"choices":[' + orjson.dumps(choice) + b"]" + self._usage_null + b"}\n\n"

    def close(self, usage: Usage) -> bytes:
        if not self._call.inference.include_usage:
            return DONE
        return self._head + b',"choices":[],"usage":' + orjson.dumps(usage_dict(usage)) + b"}\n\n" + DONE

    def failed(self, error: BaseException) -> bytes:
        return b"event: error\ndata: " + error_parts(error)[1] + b"\n\n"


class ChatOutput(ChunkedOutput):
    """A chat completion, or its `chat.completion.chunk`s."""

    __slots__ = ()

    def __init__(self, call: Call) -> None:
        super().__init__(call, "chatcmpl-", "chat.completion", "chat.completion.chunk")

    # --- the whole answer ------------------------------------------------------

    def document(self, usage: Usage) -> dict[str, Any]:
        choices = []
        for choice in self._choices:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": choice.text,
                "refusal": None,
                "annotations": [],
            }
            if choice.tool_calls:
                message["tool_calls"] = choice.tool_call_list()
                if not choice.texts:
                    message["content"] = None
            if choice.fields:
                message.update(choice.fields)
            logprobs = (
                None
                if choice.logprob_tokens is None
                else {"content": choice.logprob_tokens, "refusal": None}
            )
            choices.append({
                "index": choice.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason or "stop",
            })
        return self._document(choices, usage)

    # --- the stream ------------------------------------------------------------

    def open(self) -> bytes:
        # The role first, for every choice.
        return b"".join(
            self._chunk({
                "index": index,
                "delta": {"role": "assistant", "content": "", "refusal": None},
                "logprobs": None,
                "finish_reason": None,
            })
            for index in range(self._call.inference.num_choices)
        )

    def event(self, delta: Delta) -> bytes:
        if not delta.has_output and delta.finish_reason is None and delta.logprobs is None:
            return b""
        message: dict[str, Any] = {}
        if delta.text:
            message["content"] = delta.text
        if delta.tool_calls:
            message["tool_calls"] = delta.tool_calls
        if delta.fields:
            message.update(delta.fields)
        logprobs = delta.logprobs
        if logprobs is not None and "refusal" not in logprobs:
            logprobs = {**logprobs, "refusal": None}
        return self._chunk({
            "index": delta.index,
            "delta": message,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        })
