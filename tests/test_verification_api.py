"""Verified organizations end to end: model gates (by model, by streaming),
the document workflow over HTTP and the CLI, the 90-day rule, the audit log."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import openai
import pytest

from billing_support import cli, new_org
from conftest import Gateway, sim_engine, sim_model_id, wait_for

MESSAGES = [{"role": "user", "content": "hello"}]
DOCUMENT = {"document_type": "passport", "country": "NL", "number": "NX-12 34 56"}
REFRESH = 0.1


@pytest.fixture(scope="module")
def gated(
    start_gateway: Callable[..., Gateway], tmp_path_factory: pytest.TempPathFactory
) -> Gateway:
    db_url = f"sqlite:///{tmp_path_factory.mktemp('gated') / 'flexserve.db'}"
    engine = sim_engine()
    cli(db_url, "models", "gate", engine.models()[0].id, "--verification", "streaming")
    return start_gateway(engines=[engine], engine="sim", db=db_url, policy_refresh_interval=REFRESH)


@pytest.fixture(scope="module")
def model(gated: Gateway) -> str:
    return sim_model_id(gated)


def stream(client: openai.OpenAI, model: str) -> str:
    chunks = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=3, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_streaming_needs_verification_until_an_operator_verifies(
    gated: Gateway, model: str
) -> None:
    org = new_org(gated, "streamer")
    client = org.client()
    assert client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3).choices
    with pytest.raises(openai.PermissionDeniedError) as caught:
        stream(client, model)
    error = caught.value.body
    assert isinstance(error, dict)
    assert caught.value.code == "organization_verification_required"
    assert error["param"] == "stream" and "POST /v1/organization/verification" in error["message"]

    submitted = org.post("/v1/organization/verification", DOCUMENT)
    assert submitted.status_code == 200, submitted.text
    body = submitted.json()
    assert (body["status"], body["country"], body["reason"]) == ("pending", "NL", None)
    assert "1234" not in submitted.text
    # A fresh key is not in the gateway's key cache: it sees "pending" at once.
    with pytest.raises(openai.PermissionDeniedError) as pending:
        stream(org.client(org.member_key()), model)
    assert "pending" in pending.value.message

    assert "is verified" in cli(gated.db_url, "orgs", "verify", "streamer")
    assert stream(org.client(org.member_key()), model)
    status = org.get("/v1/organization/verification").json()
    assert (status["status"], status["request_id"]) == ("verified", body["request_id"])
    audit = cli(gated.db_url, "orgs", "audit", "streamer")
    assert "verification.submitted" in audit and "verification.verified" in audit
    assert "key:key_" in audit and "cli:" in audit


def test_bad_submissions_name_the_field(gated: Gateway) -> None:
    org = new_org(gated, "careless")
    for body, param in [
        ({**DOCUMENT, "country": "Netherlands"}, "country"),
        ({**DOCUMENT, "document_type": "library_card"}, "document_type"),
        ({"document_type": "passport", "country": "NL"}, "number"),
        ({**DOCUMENT, "number": 123456}, "number"),
    ]:
        response = org.post("/v1/organization/verification", body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


@pytest.fixture
def gate_all(gated: Gateway, model: str) -> Iterator[None]:
    cli(gated.db_url, "models", "gate", model, "--verification", "all")
    time.sleep(REFRESH * 5)
    yield
    cli(gated.db_url, "models", "gate", model, "--verification", "streaming")
    time.sleep(REFRESH * 5)


def test_gate_all_and_one_document_per_organization_per_90_days(
    gated: Gateway, model: str, gate_all: None
) -> None:
    first, second = new_org(gated, "first-holder"), new_org(gated, "second-holder")
    for org in (first, second):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            org.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        assert caught.value.code == "organization_verification_required"
        assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "model"

    document = {"document_type": "national_id", "country": "BE", "number": "BE-99887766"}
    assert first.post("/v1/organization/verification", document).json()["status"] == "pending"
    cli(gated.db_url, "orgs", "verify", "first-holder")
    assert (
        first.client(first.member_key())
        .chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        .choices
    )

    # The same document for another organization: rejected with the reason.
    same = {**document, "number": "be 9988 7766", "country": "be"}
    refused = second.post("/v1/organization/verification", same).json()
    assert refused["status"] == "rejected" and "90 days" in refused["reason"]
    assert "first-holder" not in refused["reason"]
    with pytest.raises(openai.PermissionDeniedError) as caught:
        second.client(second.member_key()).chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=2
        )
    assert "rejected" in caught.value.message
    audit = cli(gated.db_url, "orgs", "audit", "second-holder")
    assert "system" in audit and "verification.rejected" in audit and "90 days" in audit

    # An operator rejection with a reason, after a new (different) document.
    other = {**document, "number": "BE11223344"}
    assert second.post("/v1/organization/verification", other).json()["status"] == "pending"
    cli(gated.db_url, "orgs", "reject", "second-holder", "--reason", "Expired document.")
    wait_for(
        lambda: second.get("/v1/organization/verification").json()["reason"] == "Expired document."
    )
