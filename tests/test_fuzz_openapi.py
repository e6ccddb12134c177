"""Schemathesis over FlexServe's own OpenAPI document, against a real gateway.

Every operation of ``GET /openapi.json`` is fuzzed with generated requests,
valid (positive) and invalid (negative) by the document's schemas, sent over
loopback with a real admin key to a gateway in front of the sim engine. Each
answer must:

- not be a 5xx;
- conform to the document: status code, content type, headers
  (``x-request-id``), body schema; invalid requests are refused with a 4xx;
- when it is an error, be OpenAI's envelope ``{"error": {"message", "type",
  "param", "code"}}`` and carry ``x-request-id``.

Valid requests that succeed are sent again without the key and with a wrong
one (schemathesis's ignored_auth): both must be refused.

Generation is seeded, so a run sends the same requests every time. Half the
valid inference bodies have their ``model`` replaced by the served one, and
half the stored-response lookups use a real stored response, so that
requests reach the engine and the store instead of stopping at a 404.
Invalid cases are sent as generated: any 4xx refuses them.

The module prints what it sent: ``schemathesis: N requests over M
operations; statuses {...}`` (ignored_auth's re-sends not counted).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CheckContext
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi import checks as openapi_checks

from conftest import Gateway, sim_engine, sim_model_id

# Examples per operation and generation mode (positive; negative where the
# operation has something to get wrong).
MAX_EXAMPLES = 50
# A fixed seed: the same requests on every run, whatever the test's code.
SEED = 11

pytestmark = pytest.mark.timeout(300)


@dataclass
class Tally:
    """What the fuzzing did, printed at the end of the module."""

    num_requests: int = 0
    operations: set[str] = field(default_factory=set)
    # Statuses seen, by generation mode.
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)


@dataclass
class Target:
    gateway: Gateway
    schema: schemathesis.BaseSchema
    model: str
    response_id: str


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    counts = Tally()
    yield counts
    line = (
        f"schemathesis: {counts.num_requests} requests over {len(counts.operations)} operations; "
        "statuses by mode: "
        + "; ".join(
            f"{mode}: {dict(sorted(seen.items()))}" for mode, seen in counts.statuses.items()
        )
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():  # shown without -s
        print(line)


@pytest.fixture(scope="module")
def target(start_gateway: Callable[..., Gateway]) -> Target:
    # The instant sim answers at once; a small output limit keeps generated
    # requests cheap (and is written into the document as the bound it is).
    gateway = start_gateway(
        engines=[sim_engine(profile="instant")], engine="sim", max_completion_tokens=64
    )
    model = sim_model_id(gateway)
    with gateway.http() as http:
        document = http.get("/openapi.json").json()
        stored = http.post("/v1/responses", json={"model": model, "input": "hi"})
        assert stored.status_code == 200, stored.text
    # The key is the document's bearerAuth, sent with every generated request
    # and never generated itself: invalid cases go to bodies and parameters,
    # where the parsing is (ignored_auth still checks that the key is needed).
    config = schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"bearerAuth": {"bearer": gateway.api_key}}},
            "generation": {"with-security-parameters": False},
        }
    )
    schema = schemathesis.openapi.from_dict(document, config=config)
    return Target(gateway, schema, model, stored.json()["id"])


def _operations() -> list[tuple[str, bool]]:
    """Every operation the app serves, and whether a request to it can be
    invalid by the document: a body, or a query or header parameter (a path
    parameter here is any string; the key is not generated, see ``target``)."""
    from flexserve.api.openapi import build_document
    from flexserve.api.routes import inference_endpoints, routes
    from flexserve.config import Settings

    document = build_document(routes(inference_endpoints()), Settings())
    operations = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            can_be_invalid = "requestBody" in operation or any(
                p["in"] != "path" for p in operation.get("parameters", ())
            )
            operations.append((f"{method.upper()} {path}", can_be_invalid))
    return operations


def envelope_on_errors(
    ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool:
    """Every answer has x-request-id; every 4xx/5xx is OpenAI's error envelope."""
    if not response.headers.get("x-request-id", [""])[0].startswith("req_"):
        raise AssertionError(f"no x-request-id on a {response.status_code}")
    if response.status_code < 400:
        return True
    content_type = response.headers.get("content-type", [""])[0]
    if case.path.startswith("/dashboard") and response.status_code < 500:
        # Pages for a browser: a refused form is shown as a page, not JSON.
        if not content_type.startswith("text/html"):
            raise AssertionError(f"dashboard {response.status_code} answered as {content_type!r}")
        return True
    if not content_type.startswith("application/json"):
        raise AssertionError(
            f"{response.status_code} answered as {content_type!r}: {response.text[:200]!r}"
        )
    body = json.loads(response.content)
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        raise AssertionError(
            f"{response.status_code} outside the envelope: {response.text[:200]!r}"
        )
    error = body["error"]
    if set(error) != {"message", "type", "param", "code"}:
        raise AssertionError(f"envelope members {sorted(error)}")
    if not (
        isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    ):
        raise AssertionError(f"envelope message/type: {error!r}")
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        raise AssertionError(f"envelope param/code: {error!r}")
    return True


def _array_query_parameters() -> frozenset[str]:
    from flexserve.api.openapi import build_document
    from flexserve.api.routes import inference_endpoints, routes
    from flexserve.config import Settings

    document = build_document(routes(inference_endpoints()), Settings())
    return frozenset(
        p["name"]
        for methods in document["paths"].values()
        for operation in methods.values()
        for p in operation.get("parameters", ())
        if p["in"] == "query" and p.get("schema", {}).get("type") == "array"
    )


ARRAY_QUERY_PARAMETERS = _array_query_parameters()


def invalid_data_rejected(
    ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """schemathesis' negative_data_rejection, except where the invalid value
    cannot be told from a valid one on the wire: a lone value given for an
    array query parameter (`?project_ids=x`) is a one-item array."""
    query = case.query or {}
    if any(name in query and not isinstance(query[name], list) for name in ARRAY_QUERY_PARAMETERS):
        return True
    return openapi_checks.negative_data_rejection(ctx, response, case)


CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    envelope_on_errors,
]
POSITIVE_CHECKS = [*CHECKS, openapi_checks.ignored_auth]
NEGATIVE_CHECKS = [*CHECKS, invalid_data_rejected]


def _params() -> list[Any]:
    params = []
    for label, can_be_invalid in _operations():
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if can_be_invalid else [])
        params += [pytest.param(label, mode, id=f"{label}-{mode.value}") for mode in modes]
    return params


@pytest.mark.parametrize(("label", "mode"), _params())
def test_fuzz_operation(target: Target, tally: Tally, label: str, mode: GenerationMode) -> None:
    operation = target.schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is served but not in /openapi.json"
    strategy = operation.as_strategy(generation_mode=mode)
    if "{response_id}" in operation.path:
        strategy = st.one_of(
            strategy,
            operation.as_strategy(
                generation_mode=mode, path_parameters={"response_id": target.response_id}
            ),
        )
    positive = mode is GenerationMode.POSITIVE
    checks = POSITIVE_CHECKS if positive else NEGATIVE_CHECKS
    failures: list[str] = []

    @hypothesis.seed(SEED)
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=strategy, served_model=st.booleans())
    def run(case: schemathesis.Case, served_model: bool) -> None:
        if served_model and positive and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = target.model
        response = case.call(base_url=target.gateway.url, timeout=30)
        tally.num_requests += 1
        tally.operations.add(label)
        seen = tally.statuses.setdefault(mode.value, {})
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=checks)
        except (AssertionError, FailureGroup) as exc:  # keep going: every finding, not the first
            failures.append(
                f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:300]}\n{exc}"
            )

    run()
    assert not failures, f"{len(failures)} failing requests:\n\n" + "\n\n".join(failures[:5])
