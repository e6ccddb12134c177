"""The Batch API's bodies in FlexServe's OpenAPI document, as OpenAI's
`Batch`, `ListBatchesResponse` and `CreateBatchRequest`."""

from __future__ import annotations

from flexserve.billing.pricing import BATCH_WINDOWS
from flexserve.api.openapi_schemas import BOOLEAN, INTEGER, STRING, Schema, nullable, object_of, ref

_STATUSES = [
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
    "cancelled",
]

_METADATA = nullable({
    "type": "object",
    "maxProperties": 16,
    "propertyNames": {"maxLength": 64},
    "additionalProperties": {"type": "string", "maxLength": 512},
})

_BATCH_ERROR = object_of(
    ("code", "message", "param", "line"),
    code=STRING,
    message=STRING,
    param=nullable(STRING),
    line=nullable(INTEGER),
)

_BATCH = object_of(
    ("id", "object", "endpoint", "input_file_id", "completion_window", "status", "created_at",
     "request_counts", "metadata"),
    id=STRING,
    object={"type": "string", "enum": ["batch"]},
    endpoint=STRING,
    model=STRING,
    errors=object_of(
        ("object", "data"),
        object={"type": "string", "enum": ["list"]},
        data={"type": "array", "items": ref("BatchError")},
    ),
    input_file_id=STRING,
    completion_window=STRING,
    status={"type": "string", "enum": _STATUSES},
    output_file_id=STRING,
    error_file_id=STRING,
    created_at=INTEGER,
    in_progress_at=INTEGER,
    expires_at=INTEGER,
    finalizing_at=INTEGER,
    completed_at=INTEGER,
    failed_at=INTEGER,
    expired_at=INTEGER,
    cancelling_at=INTEGER,
    cancelled_at=INTEGER,
    request_counts=object_of(
        ("total", "completed", "failed"), total=INTEGER, completed=INTEGER, failed=INTEGER
    ),
    usage=object_of(
        ("input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details",
         "total_tokens"),
        input_tokens=INTEGER,
        input_tokens_details=object_of(("cached_tokens",), cached_tokens=INTEGER),
        output_tokens=INTEGER,
        output_tokens_details=object_of(("reasoning_tokens",), reasoning_tokens=INTEGER),
        total_tokens=INTEGER,
    ),
    metadata=_METADATA,
    flexserve={
        **object_of(
            ("lines_in_flight", "cost", "estimated_completion_at"),
            lines_in_flight=INTEGER,
            cost=object_of(("value", "currency"), value={"type": "number"}, currency=STRING),
            estimated_completion_at=nullable(INTEGER),
        ),
        "description": (
            "FlexServe's own, beside OpenAI's fields: lines being run now, what the batch's "
            "ledger rows cost so far (USD), and while in progress when it should be done "
            "(Unix seconds, at the pace of its lines so far; null before one has finished)."
        ),
    },
)

_BATCH_LIST = object_of(
    ("object", "data", "has_more"),
    object={"type": "string", "enum": ["list"]},
    data={"type": "array", "items": ref("Batch")},
    first_id=STRING,
    last_id=STRING,
    has_more=BOOLEAN,
)

_CREATE_BATCH = object_of(
    ("input_file_id", "endpoint", "completion_window"),
    input_file_id={
        "type": "string",
        "description": "A file of purpose `batch` (JSONL, one request a line).",
    },
    endpoint={
        "type": "string",
        "enum": ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"],
    },
    completion_window={
        "type": "string",
        "enum": list(BATCH_WINDOWS),
        "description": (
            "OpenAI's `24h` at the batch price, or FlexServe's own `1h` and `7d`, each "
            "priced in the price book (`flexserve prices list`)."
        ),
    },
    metadata=_METADATA,
    output_expires_after={
        **object_of(
            ("anchor", "seconds"),
            anchor={"type": "string", "enum": ["created_at"]},
            seconds={"type": "integer", "minimum": 3600, "maximum": 2592000},
        ),
        "description": "The output and error files expire this long after they are made.",
    },
)


def batch_schemas() -> dict[str, Schema]:
    return {
        "Batch": _BATCH,
        "BatchError": _BATCH_ERROR,
        "ListBatchesResponse": _BATCH_LIST,
        "CreateBatchRequest": _CREATE_BATCH,
    }
