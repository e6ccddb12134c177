"""`GET /openapi.json`: FlexServe's own OpenAPI document describes exactly the
routes the app serves, with the bodies its handlers really take and write."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
import referencing
import referencing.jsonschema
from schemathesis.specs.openapi.definitions import OPENAPI_31
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from conftest import Gateway, sim_model_id
from flexserve.api.openapi import build_document, served_operations
from flexserve.api.routes import inference_endpoints, routes
from flexserve.api.schemas.chat import ChatCompletionRequest
from flexserve.app import create_app
from flexserve.config import Settings
from flexserve.tiers import REQUESTABLE_TIERS

DOC_URI = "urn:flexserve-openapi"


@pytest.fixture(scope="module")
def document(sim_gateway: Gateway) -> dict[str, Any]:
    response = httpx.get(sim_gateway.url + "/openapi.json", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"].startswith("req_")
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def model(sim_gateway: Gateway) -> str:
    return sim_model_id(sim_gateway)


def validate(document: dict[str, Any], instance: Any, schema: dict[str, Any]) -> None:
    """Raise unless ``instance`` fits ``schema`` (which may $ref the document's components)."""
    resource = referencing.Resource.from_contents(
        document, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry: referencing.Registry[Any] = referencing.Registry().with_resource(DOC_URI, resource)
    jsonschema.Draft202012Validator(_rebase(schema), registry=registry).validate(instance)


def _rebase(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                DOC_URI + v
                if k == "$ref" and isinstance(v, str) and v.startswith("#")
                else _rebase(v)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rebase(v) for v in node]
    return node


def answer_schema(
    document: dict[str, Any], method: str, path: str, status: str = "200"
) -> dict[str, Any]:
    answer = document["paths"][path][method]["responses"][status]
    if "$ref" in answer:
        answer = document["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    schema: dict[str, Any] = answer["content"]["application/json"]["schema"]
    return schema


def test_document_is_openapi_31(document: dict[str, Any]) -> None:
    jsonschema.validate(document, OPENAPI_31)
    assert document["openapi"].startswith("3.1")
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert document["security"] == [{"bearerAuth": []}]


def test_every_route_is_documented_and_nothing_else(
    sim_gateway: Gateway, document: dict[str, Any]
) -> None:
    app = create_app(sim_gateway.settings)
    served = set(served_operations(app.routes))
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served == documented
    # The inference endpoints, answered ahead of the router, are there too.
    assert {("post", e.path) for e in inference_endpoints()} <= documented
    assert ("get", "/openapi.json") in documented


def test_an_undescribed_route_fails_the_build() -> None:
    async def handler(request: Request) -> Response:
        return Response()

    with pytest.raises(KeyError, match="GET /v1/somewhere-new"):
        build_document(
            [*routes(inference_endpoints()), Route("/v1/somewhere-new", handler)], Settings()
        )


def test_operations_document_errors_request_id_and_auth(document: dict[str, Any]) -> None:
    # No bearer key: the dashboard signs in with a form and keeps a session cookie.
    public = {"/healthz", "/metrics", "/openapi.json", "/dashboard", "/dashboard/login",
              "/dashboard/logout", "/dashboard/style.css", "/dashboard/verification/approve",
              "/dashboard/verification/reject"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            assert len(operation["operationId"]) > 3, where
            for status, answer in operation["responses"].items():
                if "$ref" in answer:
                    answer = document["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
                    # Every error is the one envelope.
                    assert answer["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"
                    }, (where, status)
                header = answer["headers"]["x-request-id"]
                assert header == {"$ref": "#/components/headers/RequestId"}, (where, status)
            if path in public:
                assert operation["security"] == [], where
            else:
                assert "security" not in operation, where  # the document's bearerAuth
                assert "401" in operation["responses"], where
            assert {"400", "5XX"} <= set(operation["responses"]), where
    error = document["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"message", "type", "param", "code"}


def test_request_bodies_are_the_structs_the_endpoints_validate_with(
    sim_gateway: Gateway, document: dict[str, Any]
) -> None:
    schemas = document["components"]["schemas"]
    _, generated = msgspec.json.schema_components(
        [ChatCompletionRequest], ref_template="#/components/schemas/{name}"
    )
    assert set(schemas["ChatCompletionRequest"]["properties"]) == set(
        ChatCompletionRequest.__struct_fields__
    )
    # Nested structs come along, as msgspec describes them.
    for name in generated:
        if name != "ChatCompletionRequest":
            assert schemas[name] == generated[name], name
    # The limits the endpoints check after decoding are written in.
    chat = schemas["ChatCompletionRequest"]["properties"]
    limit = {"type": "integer", "minimum": 1, "maximum": sim_gateway.settings.max_completion_tokens}
    assert limit in chat["max_tokens"]["anyOf"]
    assert chat["messages"]["maxItems"] == sim_gateway.settings.max_messages
    assert chat["service_tier"]["anyOf"][0]["enum"] == list(REQUESTABLE_TIERS)
    paths = document["paths"]
    for path, name in [
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
        ("/v1/embeddings", "EmbeddingRequest"),
        ("/v1/responses", "ResponsesRequest"),
    ]:
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}


def test_request_schema_accepts_what_the_server_accepts_and_refuses_what_it_refuses(
    sim_gateway: Gateway, document: dict[str, Any], model: str
) -> None:
    schema = {"$ref": "#/components/schemas/ChatCompletionRequest"}
    good = {
        "model": model,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        "max_tokens": 4,
        "service_tier": "flex",
        "response_format": {"type": "json_object"},
    }
    bad = {"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}
    validate(document, good, schema)
    with pytest.raises(jsonschema.ValidationError):
        validate(document, bad, schema)
    with sim_gateway.http() as http:
        assert (
            http.post("/v1/chat/completions", json={**good, "response_format": None}).status_code
            == 200
        )
        refused = http.post("/v1/chat/completions", json=bad)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "temperature"


def test_real_answers_fit_the_documented_schemas(
    sim_gateway: Gateway, document: dict[str, Any], model: str
) -> None:
    def check(method: str, path: str, response: httpx.Response, status: str = "200") -> None:
        assert str(response.status_code) == status, (path, response.text)
        validate(document, response.json(), answer_schema(document, method, path, status))

    user = [{"role": "user", "content": "hi"}]
    posts = {
        "/v1/chat/completions": {"model": model, "messages": user, "max_tokens": 5},
        "/v1/completions": {"model": model, "prompt": "hi", "max_tokens": 5},
        "/v1/embeddings": {"model": model, "input": ["a", "b"]},
        "/v1/responses": {"model": model, "input": "hi", "max_output_tokens": 5},
    }
    gets: dict[str, tuple[str, dict[str, Any]]] = {
        "/v1/models": ("/v1/models", {}),
        "/v1/models/{model}": (f"/v1/models/{model}", {}),
        "/v1/flex/status": ("/v1/flex/status", {}),
        "/v1/organization/usage/completions": (
            "/v1/organization/usage/completions",
            {"start_time": 0, "group_by": "model", "limit": 2},
        ),
        "/v1/organization/costs": (
            "/v1/organization/costs",
            {"start_time": 0, "group_by": "line_item"},
        ),
        "/v1/organization/flex/savings": ("/v1/organization/flex/savings", {"start_time": 0}),
        "/v1/organization/verification": ("/v1/organization/verification", {}),
        "/healthz": ("/healthz", {}),
    }
    with sim_gateway.http() as http:
        for path, body in posts.items():
            response = http.post(path, json=body)
            check("post", path, response)
        response_id = response.json()["id"]  # the last: /v1/responses
        gets["/v1/responses/{response_id}"] = (f"/v1/responses/{response_id}", {})
        gets["/v1/responses/{response_id}/input_items"] = (
            f"/v1/responses/{response_id}/input_items",
            {},
        )
        for path, (url, params) in gets.items():
            check("get", path, http.get(url, params=params))
        # Errors: the envelope, as documented for their status.
        check("get", "/v1/models/{model}", http.get("/v1/models/no-such-model"), "404")
        check(
            "post",
            "/v1/chat/completions",
            http.post("/v1/chat/completions", json={"model": model}),
            "400",
        )
        check("get", "/v1/organization/costs", http.get("/v1/organization/costs"), "400")
    check("get", "/v1/models", httpx.get(sim_gateway.url + "/v1/models"), "401")
