"""`CreateChatCompletionRequest`, as far as FlexServe reads it.

Every field of OpenAI's schema is here, so that a field FlexServe knows is
never mistaken for an unknown one; those an engine must honour are listed by
``features_needed`` with the parameter that needs them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from flexserve.engines.base import Feature

NonEmpty = Annotated[str, Meta(min_length=1)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]

MAX_N = 128
MAX_STOP_SEQUENCES = 4


class TextPart(Struct, tag_field="type", tag="text"):
    text: str


class ImageURL(Struct):
    url: str
    detail: str | None = None


class ImagePart(Struct, tag_field="type", tag="image_url"):
    image_url: ImageURL


class InputAudio(Struct):
    data: str
    format: str


class AudioPart(Struct, tag_field="type", tag="input_audio"):
    input_audio: InputAudio


class FilePart(Struct, tag_field="type", tag="file"):
    file: dict[str, Any]


class RefusalPart(Struct, tag_field="type", tag="refusal"):
    refusal: str


ContentPart = TextPart | ImagePart | AudioPart | FilePart | RefusalPart
Content = str | list[ContentPart]


class FunctionCall(Struct):
    name: str
    arguments: str


class ToolCall(Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class SystemMessage(Struct, tag_field="role", tag="system"):
    content: Content
    name: str | None = None


class DeveloperMessage(Struct, tag_field="role", tag="developer"):
    content: Content
    name: str | None = None


class UserMessage(Struct, tag_field="role", tag="user"):
    content: Content
    name: str | None = None


class AssistantMessage(Struct, tag_field="role", tag="assistant"):
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None


class ToolMessage(Struct, tag_field="role", tag="tool"):
    content: Content
    tool_call_id: str


class FunctionMessage(Struct, tag_field="role", tag="function"):
    content: str | None
    name: str


Message = (
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage
)


class FunctionDefinition(Struct):
    name: NonEmpty
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct):
    type: str = "function"
    function: FunctionDefinition | None = None
    # `custom` tools (grammar or free-form input) carry their definition here.
    custom: dict[str, Any] | None = None


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct):
    type: str
    function: NamedFunction | None = None


class TextFormat(Struct, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(Struct, tag_field="type", tag="json_object"):
    pass


class JsonSchema(Struct):
    name: NonEmpty
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class JsonSchemaFormat(Struct, tag_field="type", tag="json_schema"):
    json_schema: JsonSchema


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class StreamOptions(Struct):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatCompletionRequest(Struct):
    model: NonEmpty
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    response_format: ResponseFormat | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    service_tier: str | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: Any = None


KNOWN_FIELDS = frozenset(ChatCompletionRequest.__struct_fields__)

# Fields that change what a model produces and that only an upstream server
# can act on: the embedded and sim engines refuse them (Feature.EXTRA_FIELDS).
UPSTREAM_ONLY_FIELDS = ("reasoning_effort", "verbosity", "prediction", "web_search_options")


def features_needed(request: ChatCompletionRequest) -> list[tuple[Feature, str]]:
    """What the request needs of its engine, each with the parameter that needs it."""
    needs: list[tuple[Feature, str]] = []
    if request.tools or request.functions:
        needs.append((Feature.TOOLS, "tools" if request.tools else "functions"))
    elif request.tool_choice is not None and request.tool_choice != "none":
        needs.append((Feature.TOOLS, "tool_choice"))
    format_ = request.response_format
    if format_ is not None:
        if type(format_) is JsonObjectFormat:
            needs.append((Feature.JSON_OBJECT, "response_format"))
        elif type(format_) is JsonSchemaFormat:
            needs.append((Feature.JSON_SCHEMA, "response_format"))
    if request.logprobs:
        needs.append((Feature.LOGPROBS, "logprobs"))
    elif request.top_logprobs:
        needs.append((Feature.LOGPROBS, "top_logprobs"))
    if request.n is not None and request.n > 1:
        needs.append((Feature.N, "n"))
    if request.presence_penalty:
        needs.append((Feature.PENALTIES, "presence_penalty"))
    if request.frequency_penalty:
        needs.append((Feature.PENALTIES, "frequency_penalty"))
    if request.logit_bias:
        needs.append((Feature.LOGIT_BIAS, "logit_bias"))
    if request.audio is not None or (request.modalities and "audio" in request.modalities):
        needs.append((Feature.AUDIO, "audio" if request.audio is not None else "modalities"))
    if (
        request.reasoning_effort is not None
        or request.verbosity is not None
        or request.prediction is not None
        or request.web_search_options is not None
    ):
        for name in UPSTREAM_ONLY_FIELDS:
            if getattr(request, name) is not None:
                needs.append((Feature.EXTRA_FIELDS, name))
    for i, message in enumerate(request.messages):
        content = message.content
        if type(content) is str and type(message) in _PLAIN_MESSAGES:
            continue
        if isinstance(message, ToolMessage | FunctionMessage):
            needs.append((Feature.TOOLS, f"messages[{i}].role"))
        elif isinstance(message, AssistantMessage) and (message.tool_calls or message.function_call):
            needs.append((Feature.TOOLS, f"messages[{i}].tool_calls"))
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, ImagePart):
                    needs.append((Feature.IMAGES, f"messages[{i}].content[{j}]"))
                elif isinstance(part, AudioPart):
                    needs.append((Feature.AUDIO, f"messages[{i}].content[{j}]"))
                elif isinstance(part, FilePart):
                    needs.append((Feature.EXTRA_FIELDS, f"messages[{i}].content[{j}]"))
    return needs


# Messages that need nothing of an engine when their content is a string.
_PLAIN_MESSAGES = (SystemMessage, DeveloperMessage, UserMessage)


def text_chars(request: ChatCompletionRequest) -> tuple[int, int]:
    """Characters and UTF-8 bytes of the prompt's text (tool definitions included)."""
    chars = num_bytes = 0
    for message in request.messages:
        content = message.content
        if isinstance(content, str):
            chars += len(content)
            num_bytes += len(content.encode())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, TextPart):
                    chars += len(part.text)
                    num_bytes += len(part.text.encode())
                else:
                    # An image or file: a few hundred tokens is a fair guess.
                    chars += 1024
                    num_bytes += 1024
        if isinstance(message, AssistantMessage) and message.tool_calls:
            for call in message.tool_calls:
                size = len(call.function.arguments) + len(call.function.name)
                chars += size
                num_bytes += size * 4
    if request.tools:
        size = len(msgspec.json.encode(request.tools))
        chars += size
        num_bytes += size
    return chars, num_bytes
