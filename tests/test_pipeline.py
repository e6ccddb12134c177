"""The pipeline's own rules, without a network: how long a flex request may
wait, and what a request needs of its engine."""

from __future__ import annotations

import pytest

from flexserve.api.endpoints.chat import ChatCompletions
from flexserve.api.inference import check_features
from flexserve.api.pipeline import _flex_max_wait, flex_wait_for_timeout
from flexserve.config import Settings
from flexserve.engines.base import ALL_FEATURES, Feature
from flexserve.errors import InvalidRequestError


@pytest.mark.parametrize(
    ("timeout", "wait"), [(600.0, 540.0), (900.0, 840.0), (60.0, 50.0), (30.0, 20.0), (5.0, 0.0)]
)
def test_flex_wait_leaves_the_client_time_to_get_its_answer(timeout: float, wait: float) -> None:
    assert flex_wait_for_timeout(timeout) == wait


def test_client_limits_combine() -> None:
    assert _flex_max_wait(None, None) is None
    assert _flex_max_wait("30", "600") == 30.0
    assert _flex_max_wait("900", "600") == 540.0
    assert _flex_max_wait(None, "600.0") == 540.0
    # The SDK's header is a hint: one that makes no sense is ignored, not refused.
    assert _flex_max_wait(None, "soon") is None
    assert _flex_max_wait(None, "-1") is None
    with pytest.raises(InvalidRequestError):
        _flex_max_wait("soon", None)


def chat(**fields: object) -> object:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletions().parse(body, "req_1", Settings())


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
         "response_format"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"42": -100}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
         "messages[0].content[1]"),
        ({"messages": [{"role": "tool", "tool_call_id": "c1", "content": "42"}]}, "messages[0].role"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
    ],
)
def test_what_an_engine_lacks_is_refused_by_name(fields: dict[str, object], param: str) -> None:
    inference = chat(**fields)
    check_features(inference, ALL_FEATURES, "m")  # an upstream takes it all
    with pytest.raises(InvalidRequestError) as refused:
        check_features(inference, frozenset(), "m")
    assert refused.value.param == param
    assert refused.value.code == "unsupported_parameter"


def test_unknown_fields_pass_only_where_an_engine_takes_them() -> None:
    inference = chat(top_k=20)
    check_features(inference, frozenset({Feature.EXTRA_FIELDS}), "m")
    with pytest.raises(InvalidRequestError) as refused:
        check_features(inference, frozenset(), "m")
    assert refused.value.param == "top_k" and refused.value.code == "unknown_parameter"


def test_the_engine_gets_the_body_as_sent_less_the_gateways_fields() -> None:
    body = {
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "service_tier": "flex", "stream": True, "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "top_k": 5,
    }
    inference = ChatCompletions().parse(body, "req_1", Settings())
    assert inference.engine.body == {k: v for k, v in body.items()
                                     if k not in ("service_tier", "stream", "stream_options")}
    assert inference.stream and inference.include_usage and inference.service_tier == "flex"
