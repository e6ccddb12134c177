"""`CreateResponse`, and its translation to a chat completion request.

The Responses API is served on the engines' chat path: `instructions`
become a system message, input items become chat messages (messages,
function calls and their outputs), function tools and `text.format` become
chat `tools` and `response_format`. Input items and tools FlexServe cannot
turn into chat (built-in tools, item references, files) are refused by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from flexserve.api.schemas.chat import JsonSchema, NonEmpty
from flexserve.errors import InvalidRequestError


class TextFormatText(Struct, tag_field="type", tag="text"):
    pass


class TextFormatJsonObject(Struct, tag_field="type", tag="json_object"):
    pass


class TextFormatJsonSchema(Struct, tag_field="type", tag="json_schema"):
    name: NonEmpty
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


TextFormat = TextFormatText | TextFormatJsonObject | TextFormatJsonSchema


class TextConfig(Struct):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(Struct):
    model: NonEmpty
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    text: TextConfig | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    moderation: Any = None


RESPONSES_FIELDS = frozenset(ResponsesRequest.__struct_fields__)

# `include` entries that ask for nothing this server produces otherwise.
_HARMLESS_INCLUDES = frozenset({"reasoning.encrypted_content", "message.output_text.logprobs"})
_NOT_SERVED = {
    "background": "Background responses are not supported by this server.",
    "conversation": "Conversations are not supported by this server; use previous_response_id.",
    "prompt": "Prompt templates are not supported by this server.",
}


def check_unsupported(request: ResponsesRequest) -> None:
    """400 for what the Responses API has and this server cannot do."""
    for name, why in _NOT_SERVED.items():
        if getattr(request, name):
            raise InvalidRequestError(why, param=name, code="unsupported_parameter")
    for i, entry in enumerate(request.include or ()):
        if entry not in _HARMLESS_INCLUDES:
            raise InvalidRequestError(
                f"Invalid value for 'include[{i}]': {entry!r} is not available on this server.",
                param=f"include[{i}]",
                code="unsupported_parameter",
            )


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses function tools as chat tools."""
    converted = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise InvalidRequestError(
                f"Tools of type {tool.get('type')!r} are not supported by this server; "
                "only function tools are.",
                param=f"tools[{i}].type",
                code="unsupported_parameter",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(
                f"Missing required parameter: 'tools[{i}].name'.", param=f"tools[{i}].name",
                code="missing_required_parameter",
            )
        function: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequestError(
                f"Invalid value for 'tool_choice': {choice!r}.", param="tool_choice",
                code="invalid_value",
            )
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequestError(
        "Invalid 'tool_choice': only 'none', 'auto', 'required' or a function "
        "({'type': 'function', 'name': …}) are supported.",
        param="tool_choice",
        code="unsupported_parameter",
    )


def response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = None if text is None else text.format
    if fmt is None or isinstance(fmt, TextFormatText):
        return None
    if isinstance(fmt, TextFormatJsonObject):
        return {"type": "json_object"}
    schema = JsonSchema(fmt.name, fmt.description, fmt.schema, fmt.strict)
    return {
        "type": "json_schema",
        "json_schema": {k: v for k, v in _fields(schema).items() if v is not None},
    }


def _fields(struct: Struct) -> dict[str, Any]:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}


def text_format(text: TextConfig | None) -> dict[str, Any]:
    """`text.format` as the Response object echoes it."""
    fmt = None if text is None else text.format
    if fmt is None:
        return {"type": "text"}
    out = {"type": type(fmt).__struct_config__.tag}
    out.update({k: v for k, v in _fields(fmt).items() if v is not None})
    return out


def input_messages(value: str | list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input as chat messages, and as the input items it was (with types)."""
    if value is None:
        return [], []
    if isinstance(value, str):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        return [{"role": "user", "content": value}], [item]
    messages: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, param))
            items.append({**item, "type": "message"})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", param),
                "type": "function",
                "function": {
                    "name": _string(item, "name", param),
                    "arguments": _string(item, "arguments", param),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            items.append(item)
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(p.get("text") or "" for p in output if isinstance(p, dict))
            if not isinstance(output, str):
                raise InvalidRequestError(
                    f"Invalid type for '{param}.output': expected a string.",
                    param=f"{param}.output", code="invalid_type",
                )
            messages.append(
                {"role": "tool", "tool_call_id": _string(item, "call_id", param), "content": output}
            )
            items.append(item)
        elif kind == "reasoning":
            items.append(item)  # nothing for a chat engine to read
        else:
            raise InvalidRequestError(
                f"Input items of type {kind!r} are not supported by this server.",
                param=f"{param}.type",
                code="unsupported_parameter",
            )
    return messages, items


_ROLES = ("user", "assistant", "system", "developer")


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise InvalidRequestError(
            f"Invalid value for '{param}.role': {role!r}. Supported values are: "
            + ", ".join(repr(r) for r in _ROLES) + ".",
            param=f"{param}.role",
            code="invalid_value",
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"Invalid type for '{param}.content': expected a string or an array of content parts.",
            param=f"{param}.content",
            code="invalid_type",
        )
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        part_param = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            parts.append({"type": "text", "text": _string(part, "text", part_param)})
        elif kind == "refusal":
            parts.append({"type": "text", "text": _string(part, "refusal", part_param)})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise InvalidRequestError(
                    "Only images given by 'image_url' are supported by this server.",
                    param=f"{part_param}.image_url", code="unsupported_parameter",
                )
            image: dict[str, Any] = {"url": url}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise InvalidRequestError(
                f"Content parts of type {kind!r} are not supported by this server.",
                param=f"{part_param}.type",
                code="unsupported_parameter",
            )
    if role == "assistant":
        # Chat takes an assistant's earlier answer as text.
        return {"role": role, "content": "".join(p.get("text", "") for p in parts)}
    return {"role": role, "content": parts}


def _string(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"Missing required parameter: '{param}.{name}'." if value is None
            else f"Invalid type for '{param}.{name}': expected a string.",
            param=f"{param}.{name}",
            code="missing_required_parameter" if value is None else "invalid_type",
        )
    return value
