"""FlexServe's own OpenAPI document, served at ``GET /openapi.json``.

The document is generated from the code that serves the requests, so that
clients and fuzzers can rely on it:

- the paths are the app's own routes: each must have an entry in
  ``_operations``, and building the document fails for one that has none, so
  a route cannot be added without being described;
- the bodies come from ``api/openapi_schemas.py``: the inference requests
  are the msgspec structs the endpoints validate with;
- every error is the one envelope (``ErrorResponse``), every answer carries
  ``x-request-id``, and every route but health, metrics and this document
  needs the bearer key.

It is built on the first request and kept on the app's state: the routes and
settings it depends on do not change while the app runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from flexserve import __version__
from flexserve.api import admin_params
from flexserve.api.openapi_schemas import (
    BOOLEAN,
    STRING,
    Schema,
    component_schemas,
    ref,
)
from flexserve.billing.reports import COST_GROUP_BY, USAGE_GROUP_BY
from flexserve.config import Settings


_REQUEST_ID_HEADER = {
    "description": "The request's id (`req_…`), also sent on to an upstream engine.",
    "required": True,
    "schema": STRING,
}
_RETRY_AFTER_HEADER = {"description": "Seconds to wait before retrying.", "schema": STRING}
_FLEX_ESTIMATED_WAIT_HEADER = {
    "description": (
        "Flex only: the wait (median, seconds, three significant digits) estimated for the "
        "request when it arrived; absent when no estimate could be made."
    ),
    "schema": STRING,
}

# The error answers, by status: (component name, description).
_ERRORS = {
    "400": (
        "BadRequest",
        "Invalid request: `param` names the field, with its path (on every route: more than "
        "one Authorization header).",
    ),
    "401": ("Unauthorized", "Missing, malformed, unknown or revoked API key."),
    "403": (
        "Forbidden",
        "Not allowed: an admin key is needed, or the model needs a verified organization.",
    ),
    "404": ("NotFound", "Unknown model, stored response or file."),
    "413": ("TooLarge", "The body is larger than `max_body_bytes`."),
    "429": (
        "TooManyRequests",
        "Rate limit (`rate_limit_exceeded`), budget (`insufficient_quota`) or no flex capacity "
        "before the deadline (`resource_unavailable`, never billed).",
    ),
    "5XX": (
        "ServerError",
        "The server or its engine failed (500 `internal_error`, 502 `upstream_error`, 503 "
        "`engine_unavailable`/`engine_overloaded`, 504 `upstream_timeout`).",
    ),
}


def _error_response(description: str) -> Schema:
    return {
        "description": description,
        "headers": {
            "x-request-id": _ref_response_header("RequestId"),
            "Retry-After": _ref_response_header("RetryAfter"),
            "x-flex-estimated-wait": _ref_response_header("FlexEstimatedWait"),
        },
        "content": {"application/json": {"schema": ref("ErrorResponse")}},
    }


def _ref_response_header(name: str) -> Schema:
    return {"$ref": f"#/components/headers/{name}"}


def _ok(
    schema: Schema | None,
    description: str = "OK",
    *,
    media_type: str = "application/json",
    stream: bool = False,
) -> Schema:
    content: Schema = {}
    if schema is not None:
        content[media_type] = {"schema": schema}
    if stream:
        content["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": "Server-sent events, when the request sets `stream: true`.",
            }
        }
    answer: Schema = {
        "description": description,
        "headers": {"x-request-id": _ref_response_header("RequestId")},
    }
    if content:
        answer["content"] = content
    return answer


def _errors(*statuses: str) -> dict[str, Schema]:
    return {
        status: {"$ref": f"#/components/responses/{_ERRORS[status][0]}"}
        for status in (*statuses, "5XX")
    }


def _query(
    name: str,
    schema: Schema,
    description: str,
    *,
    required: bool = False,
    empty_is_absent: bool = False,
) -> Schema:
    parameter: Schema = {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }
    if schema.get("type") == "array":
        parameter.update(style="form", explode=True)
    if empty_is_absent:
        # The admin parameters take `name=` as if it were not given.
        parameter["allowEmptyValue"] = True
    return parameter


def _path(name: str, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": STRING,
        "description": description,
    }


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def _window(limits: dict[str, tuple[int, int]]) -> list[Schema]:
    """The report window's query parameters, as ``admin_params.window`` reads them."""
    unix_time: Schema = {"type": "integer", "minimum": 0, "maximum": admin_params.MAX_UNIX_TIME}
    largest = max(high for _, high in limits.values())
    per_width = ", ".join(f"{w} up to {high} (default {low})" for w, (low, high) in limits.items())
    return [
        _query("start_time", unix_time, "Start (unix seconds, inclusive).", required=True),
        _query(
            "end_time",
            unix_time,
            "End (unix seconds, exclusive); now when absent.",
            empty_is_absent=True,
        ),
        _query(
            "bucket_width",
            {"type": "string", "enum": list(limits), "default": "1d"},
            "Width of a bucket.",
            empty_is_absent=True,
        ),
        _query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": largest},
            f"Buckets per page: {per_width}.",
            empty_is_absent=True,
        ),
        _query("page", STRING, "The `next_page` cursor of the previous page."),
        _ids("project_ids", "Only these projects."),
        _ids("api_key_ids", "Only these API keys."),
    ]


def _ids(name: str, description: str) -> Schema:
    """An array parameter: repeated, or comma-separated."""
    return _query(name, _array(STRING), description)


def _group_by(fields: tuple[str, ...]) -> Schema:
    # Empty values are skipped, so `group_by=` groups by nothing.
    return _query(
        "group_by",
        _array({"type": "string", "enum": list(fields)}),
        "Group results by these fields.",
        empty_is_absent=True,
    )


_FLEX_MAX_WAIT = {
    "name": "X-Flex-Max-Wait",
    "in": "header",
    "required": False,
    "schema": {"type": "number", "minimum": 0},
    "description": "Seconds a flex request may wait for capacity (at most the server's limit).",
}


_FLEX_PLACE = {
    "name": "X-Flex-Place",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": 64},
    "description": (
        "The `place` a read of `/v1/flex/status` reported, held for a few seconds: the flex "
        "request joins the queue there, so its wait is the one that read reported."
    ),
}


def _inference(summary: str, body: str, answer: str) -> Schema:
    return {
        "summary": summary,
        "parameters": [_FLEX_MAX_WAIT, _FLEX_PLACE],
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(body)}}},
        "responses": {
            "200": _flex_ok(_ok(ref(answer), stream=answer != "EmbeddingList")),
            **_errors("400", "401", "403", "404", "413", "429"),
        },
    }


def _flex_ok(answer: Schema) -> Schema:
    answer["headers"]["x-flex-estimated-wait"] = _ref_response_header("FlexEstimatedWait")
    return answer


def _operations() -> dict[tuple[str, str], Schema]:
    """Every route's operation, by (method, OpenAPI path)."""
    admin = _errors("400", "401", "403")
    response_id = _path("response_id", "The `id` of a stored response.")
    return {
        ("post", "/v1/chat/completions"): _inference(
            "Create a chat completion", "ChatCompletionRequest", "ChatCompletion"
        ),
        ("post", "/v1/completions"): _inference(
            "Create a completion (legacy)", "CompletionRequest", "TextCompletion"
        ),
        ("post", "/v1/responses"): _inference("Create a response", "ResponsesRequest", "Response"),
        ("post", "/v1/embeddings"): _inference(
            "Create embeddings", "EmbeddingRequest", "EmbeddingList"
        ),
        ("get", "/v1/responses/{response_id}"): {
            "summary": "Retrieve a stored response",
            "parameters": [response_id],
            "responses": {"200": _ok(ref("Response")), **_errors("400", "401", "404")},
        },
        ("delete", "/v1/responses/{response_id}"): {
            "summary": "Delete a stored response",
            "parameters": [response_id],
            "responses": {
                "200": _ok(None, "Deleted (an empty body)."),
                **_errors("400", "401", "404"),
            },
        },
        ("get", "/v1/responses/{response_id}/input_items"): {
            "summary": "List a stored response's input items",
            "parameters": [
                response_id,
                _query(
                    "order",
                    {"type": "string", "enum": ["asc", "desc"], "default": "desc"},
                    "Oldest or newest first.",
                ),
            ],
            "responses": {"200": _ok(ref("ResponseItemList")), **_errors("400", "401", "404")},
        },
        **_file_operations(),
        **_batch_operations(),
        ("get", "/v1/models"): {
            "summary": "List the models served",
            "responses": {"200": _ok(ref("ModelList")), **_errors("400", "401")},
        },
        ("get", "/v1/models/{model}"): {
            "summary": "Retrieve a model",
            "parameters": [_path("model", "The model's id (it may contain '/').")],
            "responses": {"200": _ok(ref("Model")), **_errors("400", "401", "404")},
        },
        ("get", "/v1/flex/status"): {
            "summary": "Spare flex capacity, queue depth and expected wait per model",
            "description": (
                "The wait is that of a flex request sent now by the caller's organization, "
                "behind what it already has queued; `accepting` says whether it would be "
                "queued rather than refused at once with the given deadline. Asked about one "
                "model, the read holds the place it reports for a few seconds (`place`)."
            ),
            "parameters": [
                _query("model", STRING, "Only this model (404 if it is not served)."),
                _query(
                    "max_wait", {"type": "number", "minimum": 0},
                    "The client's deadline in seconds, as it will send it in `X-Flex-Max-Wait` "
                    "(at most the server's `flex_max_wait`); wins over the header.",
                ),
                {**_FLEX_MAX_WAIT, "description": "The same deadline as a header, as inference "
                 "requests send it (the `max_wait` query parameter wins)."},
                _query(
                    "place", {"type": "string", "minLength": 1, "maxLength": 64},
                    "A place held for the caller's organization (a `place` an earlier read or a "
                    "429's `x-flex-place` header named): the wait reported is that place's, and "
                    "the place is held 5 s more. A lapsed one is ignored.",
                ),
            ],
            "responses": {"200": _ok(ref("FlexStatusList")), **_errors("400", "401", "404")},
        },
        ("get", "/v1/organization/usage/completions"): {
            "summary": "Token usage by bucket (admin key)",
            "parameters": [
                *_window(admin_params.USAGE_LIMITS),
                _group_by(USAGE_GROUP_BY),
                _ids("models", "Only these models."),
                _query("batch", BOOLEAN, "Only batch (true) or only other requests (false)."),
            ],
            "responses": {"200": _ok(ref("UsageCompletionsPage")), **admin},
        },
        ("get", "/v1/organization/costs"): {
            "summary": "Costs by day (admin key)",
            "parameters": [
                *_window(admin_params.COST_LIMITS),
                _group_by(COST_GROUP_BY),
            ],
            "responses": {"200": _ok(ref("CostsPage")), **admin},
        },
        ("get", "/v1/organization/flex/savings"): {
            "summary": "What flex and batch saved against list price, by day (admin key)",
            "parameters": _window(admin_params.COST_LIMITS),
            "responses": {"200": _ok(ref("FlexSavingsPage")), **admin},
        },
        ("post", "/v1/organization/verification"): {
            "summary": "Submit an identity document to verify the organization (admin key)",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("VerificationSubmission")}},
            },
            "responses": {
                "200": _ok(ref("Verification")),
                **_errors("400", "401", "403", "413", "429"),
            },
        },
        ("get", "/v1/organization/verification"): {
            "summary": "The organization's verification status (admin key)",
            "responses": {"200": _ok(ref("Verification")), **admin},
        },
        ("get", "/healthz"): {
            "summary": "Health: healthy replicas per model",
            "security": [],
            "responses": {
                "200": _ok(ref("Health")),
                "503": {
                    "description": "A model has no healthy replica (or the server is shutting down).",
                    "headers": {"x-request-id": _ref_response_header("RequestId")},
                    "content": {
                        "application/json": {
                            "schema": {"anyOf": [ref("Health"), ref("ErrorResponse")]}
                        }
                    },
                },
                **_errors("400"),
            },
        },
        ("get", "/metrics"): {
            "summary": "Prometheus metrics",
            "security": [],
            "responses": {
                "200": _ok(STRING, "Prometheus text exposition.", media_type="text/plain"),
                **_errors("400"),
            },
        },
        **_dashboard_operations(),
        ("get", "/openapi.json"): {
            "summary": "This document",
            "security": [],
            "responses": {
                "200": _ok({"type": "object"}, "FlexServe's OpenAPI document."),
                **_errors("400"),
            },
        },
    }


def _dashboard_operations() -> dict[tuple[str, str], Schema]:
    """The dashboard (dashboard/routes.py): HTML for a browser."""
    html = _ok(STRING, "An HTML page.", media_type="text/html")
    request_id = {"x-request-id": _ref_response_header("RequestId")}
    redirect = {"description": "Done: on to /dashboard (with the session cookie set, or cleared).",
                "headers": request_id}
    refused = {"description": "A forged or expired form, or a key that is not an organization's admin "
                              "key or an operator's key (or, for a decision, not an operator's session).",
               "headers": request_id, "content": {"text/html": {"schema": STRING}}}
    decision_refused = {"description": "No such organization, nothing to decide, or no reason given.",
                        "headers": request_id, "content": {"text/html": {"schema": STRING}}}

    def form(*fields: str) -> Schema:
        return {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
            "type": "object", "properties": dict.fromkeys(fields, STRING), "required": list(fields),
            "additionalProperties": False}}}}

    return {
        ("get", "/dashboard"): {
            "summary": "The dashboard: the sign-in form, or the organization's page for a session",
            "security": [], "responses": {"200": html, **_errors("400")},
        },
        ("post", "/dashboard/login"): {
            "summary": "Sign in with an admin key (a form, with its CSRF token)",
            "security": [], "requestBody": form("key", "csrf"),
            "responses": {"303": redirect, "403": refused, **_errors("400")},
        },
        ("post", "/dashboard/logout"): {
            "summary": "Sign out (a form, with the session's CSRF token)",
            "security": [], "requestBody": form("csrf"),
            "responses": {"303": redirect, "403": refused, **_errors("400")},
        },
        ("post", "/dashboard/verification/approve"): {
            "summary": "Approve an organization's verification (an operator's session; a form)",
            "security": [], "requestBody": form("org", "csrf"),
            "responses": {"303": redirect, "400": decision_refused, "403": refused, **_errors()},
        },
        ("post", "/dashboard/verification/reject"): {
            "summary": "Reject an organization's verification, with a reason (an operator's session; a form)",
            "security": [], "requestBody": form("org", "reason", "csrf"),
            "responses": {"303": redirect, "400": decision_refused, "403": refused, **_errors()},
        },
        ("get", "/dashboard/style.css"): {
            "summary": "The dashboard's stylesheet",
            "security": [], "responses": {"200": _ok(STRING, "CSS.", media_type="text/css"), **_errors("400")},
        },
    }


def _batch_operations() -> dict[tuple[str, str], Schema]:
    batch_id = _path("batch_id", "The `id` of a batch (`batch_…`).")
    return {
        ("post", "/v1/batches"): {
            "summary": "Create a batch",
            "description": (
                "Its lines are validated, then run on the `batch` tier, below flex; every bad "
                "line is listed in `errors.data` of a `failed` batch."
            ),
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("CreateBatchRequest")}},
            },
            "responses": {"200": _ok(ref("Batch")), **_errors("400", "401", "404")},
        },
        ("get", "/v1/batches"): {
            "summary": "List the organization's batches, newest first",
            "parameters": [
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    "Batches per page.",
                ),
                _query("after", STRING, "The `last_id` of the previous page."),
            ],
            "responses": {"200": _ok(ref("ListBatchesResponse")), **_errors("400", "401")},
        },
        ("get", "/v1/batches/{batch_id}"): {
            "summary": "Retrieve a batch",
            "parameters": [batch_id],
            "responses": {"200": _ok(ref("Batch")), **_errors("400", "401", "404")},
        },
        ("post", "/v1/batches/{batch_id}/cancel"): {
            "summary": "Cancel a batch",
            "description": "Finished lines are kept (and billed); the rest get `batch_cancelled`.",
            "parameters": [batch_id],
            "responses": {"200": _ok(ref("Batch")), **_errors("400", "401", "404")},
        },
        ("get", "/v1/batches/{batch_id}/output"): {
            "summary": "The output lines finished so far (FlexServe's own)",
            "description": (
                "While the batch runs, the lines of its output file that are done, in input "
                "order, each line whole; at the end, what the output file holds."
            ),
            "parameters": [batch_id],
            "responses": {
                "200": _ok({"type": "string"}, "JSON Lines.", media_type="application/jsonl"),
                **_errors("400", "401", "404"),
            },
        },
        ("get", "/v1/batches/{batch_id}/errors"): {
            "summary": "The error lines finished so far (FlexServe's own)",
            "description": "As `/output`, for the lines of the error file.",
            "parameters": [batch_id],
            "responses": {
                "200": _ok({"type": "string"}, "JSON Lines.", media_type="application/jsonl"),
                **_errors("400", "401", "404"),
            },
        },
    }


def _file_operations() -> dict[tuple[str, str], Schema]:
    file_id = _path("file_id", "The `id` of a file (`file-…`).")
    return {
        ("post", "/v1/files"): {
            "summary": "Upload a file",
            "description": (
                "A multipart form; its text fields come before the `file` part. "
                "`purpose=batch` files may have up to 200 MB and 50,000 lines (else 400)."
            ),
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": ref("CreateFileRequest")}},
            },
            "responses": {"200": _ok(ref("OpenAIFile")), **_errors("400", "401")},
        },
        ("get", "/v1/files"): {
            "summary": "List the organization's files",
            "parameters": [
                _query("purpose", {"type": "string", "maxLength": 64}, "Only files of this purpose."),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 10000, "default": 10000},
                    "Files per page.",
                ),
                _query(
                    "order",
                    {"type": "string", "enum": ["asc", "desc"], "default": "desc"},
                    "By `created_at`: oldest or newest first.",
                ),
                _query("after", STRING, "The `last_id` of the previous page (400 if unknown)."),
            ],
            "responses": {"200": _ok(ref("ListFilesResponse")), **_errors("400", "401")},
        },
        ("get", "/v1/files/{file_id}"): {
            "summary": "Retrieve a file",
            "parameters": [file_id],
            "responses": {"200": _ok(ref("OpenAIFile")), **_errors("400", "401", "404")},
        },
        ("delete", "/v1/files/{file_id}"): {
            "summary": "Delete a file",
            "parameters": [file_id],
            "responses": {"200": _ok(ref("DeleteFileResponse")), **_errors("400", "401", "404")},
        },
        ("get", "/v1/files/{file_id}/content"): {
            "summary": "Download a file's content",
            "parameters": [file_id],
            "responses": {
                "200": _ok(
                    {"type": "string", "format": "binary"},
                    "The file's bytes.",
                    media_type="application/octet-stream",
                ),
                **_errors("400", "401", "404"),
            },
        },
    }


def served_operations(routes: Iterable[BaseRoute]) -> list[tuple[str, str]]:
    """(method, OpenAPI path) of every route the app serves (HEAD aside)."""
    served = []
    for route in routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    served.append((method.lower(), route.path_format))
    return served


def build_document(routes: Iterable[BaseRoute], settings: Settings) -> Schema:
    """FlexServe's OpenAPI document for these routes; KeyError names a route
    that has no description."""
    operations = _operations()
    paths: dict[str, dict[str, Schema]] = {}
    for method, path in served_operations(routes):
        if (method, path) not in operations:
            raise KeyError(f"{method.upper()} {path} is served but not described in api/openapi.py")
        paths.setdefault(path, {})[method] = {
            "operationId": _operation_id(method, path),
            **operations[(method, path)],
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "FlexServe",
            "version": __version__,
            "description": (
                "An OpenAI-compatible gateway with a flex service tier. Every error is "
                '`{"error": {"message", "type", "param", "code"}}`; every answer carries '
                "`x-request-id`. As in OpenAI's API, an integer parameter must be written "
                "as one: `5`, not `5.0`. Fields beyond the schemas are passed on to engines "
                "that take them, and refused (400 `unknown_parameter`) by the others."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": component_schemas(settings),
            "responses": {
                name: _error_response(description) for name, description in _ERRORS.values()
            },
            "headers": {
                "RequestId": _REQUEST_ID_HEADER,
                "RetryAfter": _RETRY_AFTER_HEADER,
                "FlexEstimatedWait": _FLEX_ESTIMATED_WAIT_HEADER,
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A FlexServe API key (`flexserve keys create`).",
                }
            },
        },
        "security": [{"bearerAuth": []}],
    }


def _operation_id(method: str, path: str) -> str:
    words = [w.strip("{}") for w in path.replace(".", "_").split("/") if w and w != "v1"]
    return "_".join([method, *words])


async def openapi_json(request: Request) -> Response:
    """GET /openapi.json: built on the first call, then served as it is."""
    state = request.app.state
    body: bytes | None = getattr(state, "openapi_document", None)
    if body is None:
        document = build_document(request.app.routes, state.services.settings)
        body = orjson.dumps(document)
        state.openapi_document = body
    return Response(body, media_type="application/json")
