"""Validation of chat completion requests against OpenAI's schema.

Hand-written rather than a generic JSON-schema pass: it is on the hot path,
and it must name the exact `param` that was wrong (``messages[2].role``), as
OpenAI does. Only the fields validated here ever reach an engine: anything
else a client sends (``api_base``, ``api_key``, extra headers…) is dropped, so
it can never redirect a request or change its credentials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flexserve.errors import InvalidRequestError
from flexserve.tiers import REQUESTABLE_TIERS

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Roles an engine here can take: tool results need tool calling, which no
# engine FlexServe drives yet.
SUPPORTED_ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_SEQUENCES = 4
MAX_N = 128

# Fields that change what the model must produce and that FlexServe's engines
# cannot honour: refused with a clear 400 rather than silently ignored.
_UNSUPPORTED_WHEN_SET = {
    "tools": "Tool calling is not supported by this server.",
    "functions": "Function calling is not supported by this server.",
    "audio": "Audio output is not supported by this server.",
    "prediction": "Predicted outputs are not supported by this server.",
}


@dataclass(slots=True)
class ChatRequest:
    """A validated `CreateChatCompletionRequest`, normalised."""

    model: str
    # Each message as {"role": str, "content": str} (+ "name" when given).
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    # The raw `service_tier` value the client sent (None when absent).
    service_tier: str | None = None
    user: str | None = None


def _invalid(message: str, param: str, code: str | None = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def _type_error(param: str, expected: str, value: Any) -> InvalidRequestError:
    return _invalid(
        f"Invalid type for '{param}': expected {expected}, but got {_kind(value)}.",
        param,
        code="invalid_type",
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(name, "a number", value)
    if not math.isfinite(value) or not low <= value <= high:
        raise _invalid(f"Invalid '{name}': {value} is not between {low:g} and {high:g}.", name)
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    return value


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            part_param = f"{param}[{j}]"
            if not isinstance(part, dict):
                raise _type_error(part_param, "an object", part)
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _type_error(f"{part_param}.text", "a string", text)
                texts.append(text)
            elif kind in ("image_url", "input_audio", "file", "refusal"):
                raise _invalid(
                    f"Content parts of type '{kind}' are not supported by this server; "
                    "send text parts only.",
                    f"{part_param}.type",
                )
            else:
                raise _invalid(f"Invalid value for '{part_param}.type': {kind!r}.", f"{part_param}.type")
        return "".join(texts)
    raise _type_error(param, "a string or an array of content parts", content)


def _messages(value: Any, max_messages: int) -> list[dict[str, Any]]:
    if value is None:
        raise _invalid("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(value, list):
        raise _type_error("messages", "an array", value)
    if not value:
        raise _invalid("Invalid 'messages': empty array. Expected at least 1 message.", "messages", "empty_array")
    if len(value) > max_messages:
        raise _invalid(
            f"Invalid 'messages': {len(value)} messages, more than the {max_messages} allowed.",
            "messages",
            "array_above_max_length",
        )
    messages = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _type_error(param, "an object", message)
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise _invalid(
                f"Invalid value for '{param}.role': {role!r}. Supported values are: "
                + ", ".join(repr(r) for r in MESSAGE_ROLES) + ".",
                f"{param}.role",
            )
        if role not in SUPPORTED_ROLES:
            raise _invalid(
                f"Messages with role '{role}' need tool calling, which this server does not support.",
                f"{param}.role",
            )
        content = message.get("content")
        if content is None:
            if role != "assistant":
                raise _invalid(
                    f"Missing required parameter: '{param}.content'.",
                    f"{param}.content",
                    "missing_required_parameter",
                )
            text = ""
        else:
            text = _content_text(content, f"{param}.content")
        normalised: dict[str, Any] = {"role": role, "content": text}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise _type_error(f"{param}.name", "a string", name)
            normalised["name"] = name
        messages.append(normalised)
    return messages


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        if len(value) > MAX_STOP_SEQUENCES:
            raise _invalid(
                f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} sequences are allowed.",
                "stop",
                "array_above_max_length",
            )
        for j, item in enumerate(value):
            if not isinstance(item, str):
                raise _type_error(f"stop[{j}]", "a string", item)
        return [item for item in value if item]
    raise _type_error("stop", "a string or an array of strings", value)


def parse_chat_request(body: Any, *, max_messages: int, max_completion_tokens: int) -> ChatRequest:
    """Validate a decoded JSON body; raise InvalidRequestError naming the param."""
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.", "body", "invalid_type")

    model = body.get("model")
    if model is None:
        raise _invalid("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _type_error("model", "a non-empty string", model)

    messages = _messages(body.get("messages"), max_messages)

    for name, why in _UNSUPPORTED_WHEN_SET.items():
        if body.get(name):
            raise _invalid(why, name, "unsupported_parameter")
    if body.get("logprobs"):
        raise _invalid("Log probabilities are not supported by this server.", "logprobs", "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise _type_error("response_format", "an object", response_format)
        if response_format.get("type") != "text":
            raise _invalid(
                "Only response_format {'type': 'text'} is supported by this server.",
                "response_format",
                "unsupported_parameter",
            )

    max_tokens = _integer(body, "max_tokens")
    max_completion = _integer(body, "max_completion_tokens")
    for name, value in (("max_tokens", max_tokens), ("max_completion_tokens", max_completion)):
        if value is not None and not 1 <= value <= max_completion_tokens:
            raise _invalid(
                f"Invalid '{name}': {value}. It must be between 1 and {max_completion_tokens}.",
                name,
                "integer_below_min_value" if value < 1 else "integer_above_max_value",
            )
    # OpenAI deprecates max_tokens in favour of max_completion_tokens; the newer one wins.
    limit = max_completion if max_completion is not None else max_tokens

    n = _integer(body, "n")
    if n is not None:
        if not 1 <= n <= MAX_N:
            raise _invalid(f"Invalid 'n': {n}. It must be between 1 and {MAX_N}.", "n")
        if n != 1:
            raise _invalid("Only n=1 is supported by this server.", "n", "unsupported_value")

    _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _integer(body, "seed")

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _type_error("stream", "a boolean", stream)
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _type_error("stream_options", "an object", stream_options)
        if not stream:
            raise _invalid(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )
        value = stream_options.get("include_usage")
        if value is not None and not isinstance(value, bool):
            raise _type_error("stream_options.include_usage", "a boolean", value)
        include_usage = bool(value)

    service_tier = body.get("service_tier")
    if service_tier is not None and service_tier not in REQUESTABLE_TIERS:
        raise _invalid(
            f"Invalid value for 'service_tier': {service_tier!r}. Supported values are: "
            + ", ".join(repr(t) for t in REQUESTABLE_TIERS) + ".",
            "service_tier",
        )

    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _type_error("user", "a string", user)

    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=limit,
        temperature=temperature,
        top_p=top_p,
        stop=_stop(body.get("stop")),
        seed=seed,
        stream=bool(stream),
        include_usage=include_usage,
        service_tier=service_tier,
        user=user,
    )
