"""FlexServe's request and response bodies as JSON Schema, for its OpenAPI
document (``api/openapi.py``).

Inference requests are the msgspec structs the endpoints validate with
(``msgspec.json.schema_components``), with the limits the endpoints check
after decoding written in: ``max_completion_tokens``, ``max_messages``, the
requestable tiers. Responses are what FlexServe's handlers write, under
OpenAI's names where they are OpenAI's objects; members a handler always
writes are required, and none are closed to additions (OpenAI adds members,
and clients must ignore what they do not know).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from flexserve.accounts.verification import DOCUMENT_TYPES
from flexserve.api.schemas.chat import ChatCompletionRequest
from flexserve.api.schemas.completions import (
    MAX_EMBEDDING_INPUTS,
    CompletionRequest,
    EmbeddingRequest,
)
from flexserve.api.schemas.responses import ResponsesRequest
from flexserve.config import Settings
from flexserve.tiers import REQUESTABLE_TIERS

Schema = dict[str, Any]

_REF = "#/components/schemas/{name}"


def ref(name: str) -> Schema:
    return {"$ref": _REF.format(name=name)}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def object_of(required: Iterable[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": list(required), "properties": properties}


STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}


# --- request bodies ---------------------------------------------------------------

_REQUEST_STRUCTS = (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest)


def request_schemas(settings: Settings) -> dict[str, Schema]:
    """The inference request bodies as msgspec sees them, with the limits
    the endpoints check after decoding written in."""
    _, components = msgspec.json.schema_components(_REQUEST_STRUCTS, ref_template=_REF)
    tier: Schema = {
        "anyOf": [{"type": "string", "enum": list(REQUESTABLE_TIERS)}, {"type": "null"}],
        "default": None,
    }
    for name in (
        "ChatCompletionRequest",
        "CompletionRequest",
        "EmbeddingRequest",
        "ResponsesRequest",
    ):
        components[name]["properties"]["service_tier"] = tier
    chat = components["ChatCompletionRequest"]["properties"]
    for field in ("max_tokens", "max_completion_tokens"):
        _bound_integer(chat[field], settings.max_completion_tokens)
    chat["messages"]["maxItems"] = settings.max_messages
    _bound_integer(
        components["CompletionRequest"]["properties"]["max_tokens"], settings.max_completion_tokens
    )
    _bound_integer(
        components["ResponsesRequest"]["properties"]["max_output_tokens"],
        settings.max_completion_tokens,
    )
    for branch in components["EmbeddingRequest"]["properties"]["input"]["anyOf"]:
        if branch.get("type") == "array":
            branch["maxItems"] = MAX_EMBEDDING_INPUTS
    components["VerificationSubmission"] = _VERIFICATION_SUBMISSION
    return dict(components)


def _bound_integer(schema: Schema, maximum: int) -> None:
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = maximum


_VERIFICATION_SUBMISSION = object_of(
    ("document_type", "country", "number"),
    document_type={"type": "string", "enum": list(DOCUMENT_TYPES)},
    country={"type": "string", "description": "ISO 3166-1 alpha-2 code, such as 'FR'."},
    number={
        "type": "string",
        "description": "4 to 32 letters and digits (spaces, dots, dashes and slashes are ignored).",
    },
)


# --- response bodies --------------------------------------------------------------

_ERROR = object_of(
    ("message", "type", "param", "code"),
    message=STRING,
    type=STRING,
    param=nullable(STRING),
    code=nullable(STRING),
)

_CHAT_USAGE = object_of(
    ("prompt_tokens", "completion_tokens", "total_tokens"),
    prompt_tokens=INTEGER,
    completion_tokens=INTEGER,
    total_tokens=INTEGER,
    prompt_tokens_details={"type": "object"},
    completion_tokens_details={"type": "object"},
)

_TOOL_CALL = object_of(
    ("id", "type", "function"),
    id=STRING,
    type=STRING,
    function=object_of(("name", "arguments"), name=STRING, arguments=STRING),
)

_CHAT_MESSAGE = object_of(
    ("role", "content"),
    role={"type": "string", "enum": ["assistant"]},
    content=nullable(STRING),
    refusal=nullable(STRING),
    tool_calls={"type": "array", "items": ref("ChatCompletionMessageToolCall")},
    annotations={"type": "array"},
)

_CHAT_COMPLETION = object_of(
    ("id", "object", "created", "model", "service_tier", "choices", "usage"),
    id=STRING,
    object={"type": "string", "enum": ["chat.completion"]},
    created=INTEGER,
    model=STRING,
    service_tier={
        "type": "string",
        "description": "The tier the request was served and billed on.",
    },
    choices={
        "type": "array",
        "items": object_of(
            ("index", "message", "logprobs", "finish_reason"),
            index=INTEGER,
            message=ref("ChatCompletionMessage"),
            logprobs=nullable({"type": "object"}),
            finish_reason=STRING,
        ),
    },
    usage=ref("CompletionUsage"),
)

_CHAT_CHUNK = object_of(
    ("id", "object", "created", "model", "service_tier", "choices"),
    id=STRING,
    object={"type": "string", "enum": ["chat.completion.chunk"]},
    created=INTEGER,
    model=STRING,
    service_tier=STRING,
    choices={
        "type": "array",
        "items": object_of(
            ("index", "delta", "finish_reason"),
            index=INTEGER,
            delta={"type": "object"},
            logprobs=nullable({"type": "object"}),
            finish_reason=nullable(STRING),
        ),
    },
    usage=nullable(ref("CompletionUsage")),
)

_TEXT_COMPLETION = object_of(
    ("id", "object", "created", "model", "service_tier", "choices", "usage"),
    id=STRING,
    object={"type": "string", "enum": ["text_completion"]},
    created=INTEGER,
    model=STRING,
    service_tier=STRING,
    choices={
        "type": "array",
        "items": object_of(
            ("index", "text", "logprobs", "finish_reason"),
            index=INTEGER,
            text=STRING,
            logprobs=nullable({"type": "object"}),
            finish_reason=STRING,
        ),
    },
    usage=ref("CompletionUsage"),
)

_EMBEDDING_LIST = object_of(
    ("object", "data", "model", "service_tier", "usage"),
    object={"type": "string", "enum": ["list"]},
    data={
        "type": "array",
        "items": object_of(
            ("object", "index", "embedding"),
            object={"type": "string", "enum": ["embedding"]},
            index=INTEGER,
            embedding={
                "anyOf": [{"type": "array", "items": NUMBER}, STRING],
                "description": "Floats, or base64 of little-endian float32 with encoding_format=base64.",
            },
        ),
    },
    model=STRING,
    service_tier=STRING,
    usage=object_of(("prompt_tokens", "total_tokens"), prompt_tokens=INTEGER, total_tokens=INTEGER),
)

_RESPONSE = object_of(
    (
        "id",
        "object",
        "created_at",
        "status",
        "error",
        "incomplete_details",
        "instructions",
        "model",
        "output",
        "parallel_tool_calls",
        "service_tier",
        "store",
        "text",
        "tool_choice",
        "tools",
        "metadata",
    ),
    id=STRING,
    object={"type": "string", "enum": ["response"]},
    created_at=INTEGER,
    completed_at=INTEGER,
    status={"type": "string", "enum": ["in_progress", "completed", "incomplete", "failed"]},
    error=nullable({"type": "object"}),
    incomplete_details=nullable({"type": "object"}),
    instructions=nullable(STRING),
    max_output_tokens=INTEGER,
    max_tool_calls=INTEGER,
    model=STRING,
    output={"type": "array", "items": ref("ResponseItem")},
    parallel_tool_calls=BOOLEAN,
    previous_response_id=STRING,
    reasoning={"type": "object"},
    service_tier=STRING,
    store=BOOLEAN,
    temperature=NUMBER,
    text={"type": "object"},
    tool_choice={"anyOf": [STRING, {"type": "object"}]},
    tools={"type": "array", "items": {"type": "object"}},
    top_logprobs=INTEGER,
    top_p=NUMBER,
    truncation=STRING,
    usage=object_of(
        ("input_tokens", "output_tokens", "total_tokens"),
        input_tokens=INTEGER,
        input_tokens_details={"type": "object"},
        output_tokens=INTEGER,
        output_tokens_details={"type": "object"},
        total_tokens=INTEGER,
    ),
    user=STRING,
    metadata={"type": "object", "additionalProperties": STRING},
)

# An output or input item: a message, a function call or its output, reasoning.
_RESPONSE_ITEM = {**object_of(("type",), type=STRING, id=STRING), "additionalProperties": True}

_RESPONSE_ITEM_LIST = object_of(
    ("object", "data", "first_id", "last_id", "has_more"),
    object={"type": "string", "enum": ["list"]},
    data={"type": "array", "items": ref("ResponseItem")},
    first_id=nullable(STRING),
    last_id=nullable(STRING),
    has_more=BOOLEAN,
)

_PRICE = object_of(("input", "cached_input", "output"), input=STRING, cached_input=STRING,
                   output=STRING)

_MODEL = object_of(
    ("id", "object", "created", "owned_by"),
    id=STRING,
    object={"type": "string", "enum": ["model"]},
    created=INTEGER,
    owned_by=STRING,
    pricing={
        "type": "object",
        "description": (
            "FlexServe: what this gateway bills per tier, dollars per million tokens as "
            "decimal strings; absent when the model has no price."
        ),
        "properties": {"priority": _PRICE, "default": _PRICE, "flex": _PRICE},
    },
)


# Files (`/v1/files`), as OpenAI's `OpenAIFile`, `ListFilesResponse` and
# `DeleteFileResponse`; the upload is the multipart form as sent on the wire.
_FILE = object_of(
    ("id", "object", "bytes", "created_at", "filename", "purpose", "status"),
    id=STRING,
    object={"type": "string", "enum": ["file"]},
    bytes=INTEGER,
    created_at=INTEGER,
    expires_at=INTEGER,
    filename=STRING,
    purpose=STRING,
    status={"type": "string", "enum": ["uploaded", "processed", "error"]},
)

_FILE_LIST = object_of(
    ("object", "data", "first_id", "last_id", "has_more"),
    object={"type": "string", "enum": ["list"]},
    data={"type": "array", "items": ref("OpenAIFile")},
    first_id=nullable(STRING),
    last_id=nullable(STRING),
    has_more=BOOLEAN,
)

_FILE_DELETED = object_of(
    ("id", "object", "deleted"),
    id=STRING,
    object={"type": "string", "enum": ["file"]},
    deleted=BOOLEAN,
)

# OpenAI's `expires_after` object, as its SDKs send it in a form.
_EXPIRES_AFTER_FIELDS: dict[str, Schema] = {
    "expires_after[anchor]": {
        "type": "string",
        "enum": ["created_at"],
        "description": "Sent before `file`, with `expires_after[seconds]`.",
    },
    "expires_after[seconds]": {
        "type": "integer",
        "minimum": 3600,
        "maximum": 2592000,
        "description": "Seconds after `created_at` the file expires (batch default: 30 days).",
    },
}

_FILE_UPLOAD = {
    **object_of(
        ("purpose", "file"),
        purpose={
            "type": "string",
            "enum": ["batch", "user_data"],
            "description": "Sent before `file`. `batch`: up to 200 MB and 50,000 lines.",
        },
        **_EXPIRES_AFTER_FIELDS,
        file={"type": "string", "format": "binary", "description": "The content, with a filename."},
    ),
    "additionalProperties": False,
    "dependentRequired": {
        "expires_after[anchor]": ["expires_after[seconds]"],
        "expires_after[seconds]": ["expires_after[anchor]"],
    },
}


def _list_of(item: Schema) -> Schema:
    return object_of(
        ("object", "data"),
        object={"type": "string", "enum": ["list"]},
        data={"type": "array", "items": item},
    )


_FLEX_STATUS = object_of(
    (
        "model", "spare_capacity", "queue_depth", "estimated_wait_seconds",
        "estimated_wait_p90_seconds", "accepting", "place",
    ),
    model=STRING,
    spare_capacity={"type": "number", "description": "Share of capacity flex may use now (0–1)."},
    queue_depth={"type": "integer", "description": "Flex requests waiting."},
    estimated_wait_seconds={
        **nullable(NUMBER),
        "description": (
            "Median wait (seconds until it starts) of a flex request sent now by the caller's "
            "organization, behind what it already has queued; 0 when flex could start at "
            "once; null only "
            "when nothing can be said (no healthy replica, or default and priority hold every "
            "slot flex could use)."
        ),
    },
    estimated_wait_p90_seconds={
        **nullable(NUMBER),
        "description": "The same wait's 90th percentile; null when the median is.",
    },
    accepting={
        "type": "boolean",
        "description": (
            "A flex request sent now with the given deadline (`max_wait`, else the server's "
            "`flex_max_wait`) would be queued rather than refused at once."
        ),
    },
    place={
        **nullable(STRING),
        "description": (
            "Asked about one model: the place in the flex queue this read reported, held for "
            "5 s; a flex request sent with `X-Flex-Place: <place>` joins the queue there. "
            "Null when the read named no model, or no wait could be estimated."
        ),
    },
)

_AMOUNT = object_of(("value", "currency"), value=NUMBER, currency=STRING)


def _page_of(result: Schema) -> Schema:
    """OpenAI's admin-report page: buckets of results."""
    bucket = object_of(
        ("object", "start_time", "end_time", "results"),
        object={"type": "string", "enum": ["bucket"]},
        start_time=INTEGER,
        end_time=INTEGER,
        results={"type": "array", "items": result},
    )
    return object_of(
        ("object", "data", "has_more", "next_page"),
        object={"type": "string", "enum": ["page"]},
        data={"type": "array", "items": bucket},
        has_more=BOOLEAN,
        next_page={**nullable(STRING), "description": "Pass as `page` for the next buckets."},
    )


_USAGE_RESULT = object_of(
    (
        "object",
        "input_tokens",
        "input_cached_tokens",
        "output_tokens",
        "num_model_requests",
        "project_id",
        "user_id",
        "api_key_id",
        "model",
        "batch",
        "service_tier",
    ),
    object={"type": "string", "enum": ["organization.usage.completions.result"]},
    input_tokens=INTEGER,
    input_cached_tokens=INTEGER,
    input_uncached_tokens=INTEGER,
    output_tokens=INTEGER,
    input_audio_tokens=INTEGER,
    output_audio_tokens=INTEGER,
    num_model_requests=INTEGER,
    project_id=nullable(STRING),
    user_id=nullable(STRING),
    api_key_id=nullable(STRING),
    model=nullable(STRING),
    batch=nullable(BOOLEAN),
    service_tier=nullable(STRING),
)

_COSTS_RESULT = object_of(
    ("object", "amount", "line_item", "project_id"),
    object={"type": "string", "enum": ["organization.costs.result"]},
    amount=ref("CostAmount"),
    line_item=nullable(STRING),
    project_id=nullable(STRING),
    api_key_id=nullable(STRING),
    quantity=nullable(INTEGER),
    quantity_unit=nullable(STRING),
)

_SAVINGS_RESULT = object_of(
    ("object", "service_tier", "num_model_requests", "list_amount", "amount", "savings"),
    object={"type": "string", "enum": ["organization.flex_savings.result"]},
    service_tier=STRING,
    num_model_requests=INTEGER,
    list_amount=ref("CostAmount"),
    amount=ref("CostAmount"),
    savings=ref("CostAmount"),
)

_VERIFICATION = object_of(
    (
        "object",
        "organization_id",
        "status",
        "request_id",
        "document_type",
        "country",
        "submitted_at",
        "decided_at",
        "reason",
    ),
    object={"type": "string", "enum": ["organization.verification"]},
    organization_id=STRING,
    status={
        "type": "string",
        "enum": ["unverified", "pending", "verified", "rejected", "superseded"],
    },
    request_id=nullable(STRING),
    document_type=nullable(STRING),
    country=nullable(STRING),
    submitted_at=nullable(INTEGER),
    decided_at=nullable(INTEGER),
    reason=nullable(STRING),
)

_HEALTH = object_of(
    ("status", "models"),
    status={"type": "string", "enum": ["ok", "degraded"]},
    models={
        "type": "object",
        "additionalProperties": INTEGER,
        "description": "Healthy replicas per model.",
    },
)


def response_schemas() -> dict[str, Schema]:
    return {
        "ErrorResponse": object_of(("error",), error=ref("Error")),
        "Error": _ERROR,
        "CompletionUsage": _CHAT_USAGE,
        "ChatCompletionMessageToolCall": _TOOL_CALL,
        "ChatCompletionMessage": _CHAT_MESSAGE,
        "ChatCompletion": _CHAT_COMPLETION,
        "ChatCompletionChunk": _CHAT_CHUNK,
        "TextCompletion": _TEXT_COMPLETION,
        "EmbeddingList": _EMBEDDING_LIST,
        "Response": _RESPONSE,
        "ResponseItem": _RESPONSE_ITEM,
        "ResponseItemList": _RESPONSE_ITEM_LIST,
        "Model": _MODEL,
        "ModelList": _list_of(ref("Model")),
        "FlexStatus": _FLEX_STATUS,
        "FlexStatusList": _list_of(ref("FlexStatus")),
        "CostAmount": _AMOUNT,
        "UsageCompletionsResult": _USAGE_RESULT,
        "UsageCompletionsPage": _page_of(ref("UsageCompletionsResult")),
        "CostsResult": _COSTS_RESULT,
        "CostsPage": _page_of(ref("CostsResult")),
        "FlexSavingsResult": _SAVINGS_RESULT,
        "FlexSavingsPage": _page_of(ref("FlexSavingsResult")),
        "Verification": _VERIFICATION,
        "Health": _HEALTH,
        "OpenAIFile": _FILE,
        "ListFilesResponse": _FILE_LIST,
        "DeleteFileResponse": _FILE_DELETED,
        "CreateFileRequest": _FILE_UPLOAD,
        **batch_schemas(),
    }


def batch_schemas() -> dict[str, Schema]:
    # Its own module: imported here, where it is used, as it imports this one.
    from flexserve.api.openapi_batch_schemas import batch_schemas as schemas

    return schemas()


def component_schemas(settings: Settings) -> dict[str, Schema]:
    """Every body of the document, by component name."""
    return {**request_schemas(settings), **response_schemas()}
