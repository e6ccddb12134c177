"""Every error path answers with OpenAI's envelope, the right status and `param`."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import Gateway, sim_model_id

MSG = [{"role": "user", "content": "hi"}]


def assert_envelope(response: httpx.Response, status: int, *, param: str | None = None,
                    code: str | None = None, error_type: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"].startswith("req_")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if error_type is not None:
        assert error["type"] == error_type
    return error


@pytest.fixture(scope="module")
def model(sim_gateway: Gateway) -> str:
    return sim_model_id(sim_gateway)


def chat(gateway: Gateway, body: Any = None, *, content: bytes | None = None,
         headers: dict[str, str] | None = None, auth: bool = True) -> httpx.Response:
    all_headers = {"Authorization": f"Bearer {gateway.api_key}"} if auth else {}
    all_headers.update(headers or {})
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, content=content,
                      headers=all_headers, timeout=30)


def test_missing_key(sim_gateway: Gateway, model: str) -> None:
    assert_envelope(chat(sim_gateway, {"model": model, "messages": MSG}, auth=False), 401,
                    code="missing_api_key")


def test_wrong_key_is_never_echoed(sim_gateway: Gateway, model: str) -> None:
    bad = "sk-fs-this-key-does-not-exist-0123456789abcdef"
    response = chat(sim_gateway, {"model": model, "messages": MSG}, headers={"Authorization": f"Bearer {bad}"})
    assert_envelope(response, 401, code="invalid_api_key")
    assert bad not in response.text and bad[-8:] not in response.text


def test_models_needs_key(sim_gateway: Gateway) -> None:
    assert_envelope(httpx.get(sim_gateway.url + "/v1/models"), 401)


def test_malformed_json(sim_gateway: Gateway) -> None:
    response = chat(sim_gateway, content=b'{"model": "x", "messages": [', headers={"Content-Type": "application/json"})
    assert_envelope(response, 400, code="invalid_json", error_type="invalid_request_error")


def test_empty_body(sim_gateway: Gateway) -> None:
    assert_envelope(chat(sim_gateway, content=b""), 400, code="invalid_json")


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"service_tier": "turbo"}, "service_tier"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0]"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"n": 10_000}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
        ({"model": 7}, "model"),
    ],
)
def test_invalid_params_name_the_param(sim_gateway: Gateway, model: str, patch: dict[str, Any], param: str) -> None:
    body = {"model": model, "messages": MSG, **patch}
    assert_envelope(chat(sim_gateway, body), 400, param=param, error_type="invalid_request_error")


def test_missing_model(sim_gateway: Gateway) -> None:
    assert_envelope(chat(sim_gateway, {"messages": MSG}), 400, param="model", code="missing_required_parameter")


def test_too_many_messages(start_gateway: Any) -> None:
    from conftest import sim_engine

    gateway = start_gateway(engines=[sim_engine()], engine="sim", max_messages=3, max_body_bytes=2048)
    model = sim_model_id(gateway)
    assert_envelope(chat(gateway, {"model": model, "messages": MSG * 4}), 400, param="messages")
    # Past the body limit: refused with 413 from Content-Length, before reading.
    big = {"model": model, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_envelope(chat(gateway, big), 413, code="request_too_large")


def test_body_too_large_without_content_length(start_gateway: Any) -> None:
    from conftest import sim_engine

    gateway = start_gateway(engines=[sim_engine()], engine="sim", max_body_bytes=1024)

    def body() -> Any:
        for _ in range(100):
            yield b"x" * 100

    response = httpx.post(gateway.url + "/v1/chat/completions", content=body(),
                          headers={"Authorization": f"Bearer {gateway.api_key}"})
    assert_envelope(response, 413)


def test_unknown_model(sim_gateway: Gateway) -> None:
    assert_envelope(chat(sim_gateway, {"model": "gpt-nope", "messages": MSG}), 404, param="model",
                    code="model_not_found")


def test_unknown_route_and_method(sim_gateway: Gateway) -> None:
    assert_envelope(httpx.get(sim_gateway.url + "/v1/nothing-here"), 404)
    assert_envelope(httpx.get(sim_gateway.url + "/v1/chat/completions"), 405)
