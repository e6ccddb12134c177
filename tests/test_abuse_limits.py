"""The gateway under abuse, end to end against a real gateway and SQLite file:
costly verification submissions bounded per organization and by a bounded
hash pool, a downgraded priority request held to the default tier's rate
limit, out-of-range query integers, a locked database, unhandled errors and
duplicate Authorization headers — every refusal in OpenAI's envelope with
``x-request-id``."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from billing_support import Org, cli, new_org
from conftest import Gateway, sim_engine, sim_model_id, wait_for
from test_error_shape import assert_envelope

PER_MINUTE = 3  # verification_submissions_per_minute of this module's gateway
MESSAGES = [{"role": "user", "content": "hi"}]
VERIFICATION = "/v1/organization/verification"


@pytest.fixture(scope="module")
def gateway(
    start_gateway: Callable[..., Gateway], tmp_path_factory: pytest.TempPathFactory
) -> Gateway:
    db_url = f"sqlite:///{tmp_path_factory.mktemp('abuse') / 'flexserve.db'}"
    return start_gateway(
        # Slow enough that a long stream holds its slot while the test works.
        engines=[sim_engine(speed=1.0)],
        engine="sim",
        db=db_url,
        policy_refresh_interval=0.1,
        verification_submissions_per_minute=PER_MINUTE,
        hash_threads=1,
        hash_queue=0,
        # One priority request in flight is priority's whole share.
        priority_share=0.01,
    )


@pytest.fixture(scope="module")
def model(gateway: Gateway) -> str:
    return sim_model_id(gateway)


def _document() -> dict[str, str]:
    return {"document_type": "passport", "country": "FR", "number": secrets.token_hex(5).upper()}


async def _submit(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post(VERIFICATION, json=_document(), headers={"Authorization": f"Bearer {key}"})


def _assert_refusal(response: httpx.Response) -> None:
    code = {429: "rate_limit_exceeded", 503: "service_unavailable"}[response.status_code]
    assert_envelope(response, response.status_code, code=code)
    assert int(response.headers["retry-after"]) >= 1


# --- expensive endpoints ------------------------------------------------------


async def test_a_verification_flood_is_refused_not_served(gateway: Gateway) -> None:
    flooder = await asyncio.to_thread(new_org, gateway, "flooder")
    tenant = await asyncio.to_thread(new_org, gateway, "tenant")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        stop = asyncio.Event()

        async def other_tenant() -> list[int]:
            statuses = []
            while not stop.is_set():
                response = await client.get(
                    "/v1/models", headers={"Authorization": f"Bearer {tenant.key}"}
                )
                statuses.append(response.status_code)
            return statuses

        watcher = asyncio.create_task(other_tenant())
        flood = await asyncio.gather(*(_submit(client, flooder.key) for _ in range(40)))
        stop.set()
        tenant_statuses = await watcher

        by_status: dict[int, list[httpx.Response]] = {}
        for response in flood:
            by_status.setdefault(response.status_code, []).append(response)
        assert set(by_status) <= {200, 429, 503}, {s: r[0].text for s, r in by_status.items()}
        # The organization's minute: a few accepted (plus what refilled meanwhile).
        assert 1 <= len(by_status.get(200, [])) <= PER_MINUTE + 1
        assert len(by_status[429]) >= 40 - PER_MINUTE - 1 - len(by_status.get(503, []))
        for response in by_status[429] + by_status.get(503, []):
            _assert_refusal(response)
        assert tenant_statuses and set(tenant_statuses) == {200}

        # Another organization is not held back by the flooder's limit.
        accepted = await _submit(client, tenant.key)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["status"] == "pending"


async def test_a_full_hash_pool_answers_503_and_gives_the_call_back(gateway: Gateway) -> None:
    # One at a time: each runs the database's migrations, which share module state.
    orgs = [await asyncio.to_thread(new_org, gateway, f"burst-{i}") for i in range(6)]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        # Keys known to the gateway's cache first, so that the burst arrives together.
        for org in orgs:
            status = await client.get(VERIFICATION, headers={"Authorization": f"Bearer {org.key}"})
            assert status.status_code == 200
        burst = await asyncio.gather(*(_submit(client, org.key) for org in orgs))
        statuses = [response.status_code for response in burst]
        assert set(statuses) <= {200, 503} and 200 in statuses, statuses
        busy = [org for org, response in zip(orgs, burst, strict=True) if response.status_code == 503]
        assert busy, "one hash thread, no queue: six at once cannot all be taken"
        for response in burst:
            if response.status_code == 503:
                _assert_refusal(response)
        # The refused call did not count: the organization still has its whole minute.
        for _ in range(PER_MINUTE):
            again = await _submit(client, busy[0].key)
            assert again.status_code == 200, again.text


# --- one rate-limit path per served tier --------------------------------------


@pytest.fixture
def priority_held(gateway: Gateway, model: str) -> Iterator[None]:
    """A priority stream in flight: priority's whole share, so that the next
    priority requests are served as default."""
    holder = new_org(gateway, f"holder-{secrets.token_hex(3)}")
    client = holder.client()
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4000, stream=True, service_tier="priority"
    )
    first = next(iter(stream))
    assert first.service_tier == "priority"
    try:
        yield
    finally:
        stream.close()


def _limit_default(gateway: Gateway, org: Org, rpm: int, model: str) -> openai.OpenAI:
    cli(gateway.db_url, "orgs", "set-rate-limit", org.name, "--tier", "default", "--rpm", str(rpm))
    client = org.client()

    def in_force() -> bool:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=MESSAGES, max_tokens=1
            )
        except openai.RateLimitError:
            return True
        return raw.headers.get("x-ratelimit-limit-requests") == str(rpm)

    wait_for(in_force)
    return client


def test_a_downgraded_request_meets_the_default_limit(
    gateway: Gateway, model: str, priority_held: None
) -> None:
    org = new_org(gateway, "downgraded")
    client = _limit_default(gateway, org, 2, model)
    with pytest.raises(openai.RateLimitError):
        for _ in range(3):  # whatever the wait above left of the minute
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)

    async def burst() -> list[Any]:
        async_client = org.async_client()

        async def one() -> Any:
            try:
                return await async_client.chat.completions.with_raw_response.create(
                    model=model, messages=MESSAGES, max_tokens=2, service_tier="priority"
                )
            except openai.APIStatusError as exc:
                return exc

        try:
            return await asyncio.gather(*(one() for _ in range(20)))
        finally:
            await async_client.close()

    outcomes = asyncio.run(burst())
    served = [o for o in outcomes if not isinstance(o, openai.APIStatusError)]
    refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    # Served as default they would pass a spent default limit: none may.
    assert [o.parse().service_tier for o in served] == [], "downgraded past the default limit"
    assert len(refused) == 20
    for error in refused:
        assert error.status_code == 429 and error.code == "rate_limit_exceeded"
        assert "default" in error.message
        headers = error.response.headers
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] == "0"


def test_a_downgraded_request_carries_the_default_headers(
    gateway: Gateway, model: str, priority_held: None
) -> None:
    org = new_org(gateway, "downgraded-ok")
    client = _limit_default(gateway, org, 100, model)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=2, service_tier="priority"
    )
    assert raw.parse().service_tier == "default"
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < 100


# --- the envelope at the edges ------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/v1/organization/usage/completions", "/v1/organization/costs", "/v1/organization/flex/savings"]
)
@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start_time": "9223372036854775808"}, "start_time"),
        ({"start_time": "9" * 5000}, "start_time"),
        ({"start_time": "1700000000", "end_time": str(2**70)}, "end_time"),
        ({"start_time": "-1"}, "start_time"),
        ({"start_time": "1700000000", "limit": str(2**64)}, "limit"),
    ],
)
def test_integer_parameters_are_bounded(
    gateway: Gateway, path: str, params: dict[str, str], param: str
) -> None:
    with gateway.http() as http:
        response = http.get(path, params=params)
    error = assert_envelope(response, 400, param=param, error_type="invalid_request_error")
    assert len(error["message"]) < 200


def test_a_locked_database_is_503_with_retry_after(gateway: Gateway) -> None:
    org = new_org(gateway, "locked-out")
    with gateway.http() as http:
        assert http.get(VERIFICATION, headers={"Authorization": f"Bearer {org.key}"}).status_code == 200
    path = gateway.db_url.removeprefix("sqlite:///")
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        # A write waits out SQLite's busy timeout, then the lock is contention, not a bug.
        response = httpx.post(
            gateway.url + VERIFICATION, json=_document(),
            headers={"Authorization": f"Bearer {org.key}"}, timeout=60,
        )
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert_envelope(response, 503, code="service_unavailable")
    assert int(response.headers["retry-after"]) >= 1
    # The driver's words (SQL, the file's path) stay in the log.
    assert "sqlite3" not in response.text and "[SQL" not in response.text and path not in response.text


def _corrupt(gateway: Gateway, sql: str, *args: Any) -> None:
    with sqlite3.connect(gateway.db_url.removeprefix("sqlite:///")) as conn:
        conn.execute(sql, args)


def test_an_unhandled_error_on_a_starlette_route_is_an_enveloped_500(gateway: Gateway) -> None:
    """A row the code cannot read (a time that is not a number) breaks the
    status route for real: its 500 goes out through Starlette's outermost
    error handler, and still carries x-request-id."""
    org = new_org(gateway, "corrupt-row")
    assert org.post(VERIFICATION, _document()).status_code == 200
    org_id = org.get(VERIFICATION).json()["organization_id"]
    _corrupt(gateway, "UPDATE verification_requests SET submitted_at = 'soon' WHERE org_id = ?", org_id)
    response = org.get(VERIFICATION)
    assert_envelope(response, 500, code="internal_error", error_type="api_error")
    # The gateway goes on serving.
    assert org.get("/v1/models").status_code == 200


def test_an_unhandled_error_on_the_inference_route_is_an_enveloped_500(
    gateway: Gateway, model: str
) -> None:
    """A project whose tier the code does not know breaks the bare chat route."""
    org = new_org(gateway, "corrupt-tier")
    _corrupt(
        gateway,
        "UPDATE projects SET default_service_tier = 'turbo' WHERE org_id = "
        "(SELECT id FROM organizations WHERE name = ?)",
        org.name,
    )
    for path in ("/v1/chat/completions", "/v1/completions"):
        body: dict[str, Any] = {"model": model, "max_tokens": 1}
        body |= {"messages": MESSAGES} if "chat" in path else {"prompt": "hi"}
        response = httpx.post(
            gateway.url + path, json=body, headers={"Authorization": f"Bearer {org.key}"}, timeout=30
        )
        assert_envelope(response, 500, code="internal_error", error_type="api_error")


# --- duplicate Authorization --------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
        ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 16}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/organization/usage/completions?start_time=1700000000", None),
        ("GET", VERIFICATION, None),
        ("POST", VERIFICATION, {"document_type": "passport", "country": "FR", "number": "AB1234"}),
        ("GET", "/healthz", None),
    ],
)
@pytest.mark.parametrize("order", ["valid first", "valid last"])
def test_duplicate_authorization_is_refused_everywhere(
    gateway: Gateway, model: str, method: str, path: str, body: dict[str, Any] | None, order: str
) -> None:
    good, bad = f"Bearer {gateway.api_key}", "Bearer sk-fs-not-a-key"
    pair = [good, bad] if order == "valid first" else [bad, good]
    if body is not None and "organization" not in path:
        body = {"model": model, **body}
    response = httpx.request(
        method, gateway.url + path, json=body, timeout=30,
        headers=[("Authorization", pair[0]), ("Authorization", pair[1])],
    )
    error = assert_envelope(response, 400, param="Authorization", code="invalid_header")
    assert "sk-fs" not in error["message"]


def test_one_authorization_header_still_works(gateway: Gateway) -> None:
    # The check counts headers, it does not trip on other headers or on one key.
    response = httpx.get(
        gateway.url + "/v1/models", timeout=30,
        headers=[("Authorization", f"Bearer {gateway.api_key}"), ("X-Other", "1"), ("X-Other", "2")],
    )
    assert response.status_code == 200



# --- NUL in the path or a query parameter ------------------------------------


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/v1/files?purpose=batch%00x", "purpose"),
        ("/v1/batches?after=batch_%00", "after"),
        ("/v1/organization/usage/completions?start_time=1700000000&project_ids=p%00", "project_ids"),
        ("/v1/organization/costs?start_time=1700000000&group_by=%00", "group_by"),
        ("/v1/models?x%00y=1", "x%00y"),
    ],
)
def test_a_nul_in_a_query_parameter_is_a_400_naming_it(gateway: Gateway, path: str, param: str) -> None:
    """PostgreSQL refuses a NUL in any text: it answered 500 there
    (schemathesis found it on `GET /v1/files?purpose=…`). Now a 400 on any
    database, before any route."""
    response = httpx.get(gateway.url + path, timeout=30,
                         headers={"Authorization": f"Bearer {gateway.api_key}"})
    error = assert_envelope(response, 400, param=param, code="invalid_value")
    assert "NUL" in error["message"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/files/file-%00"), ("DELETE", "/v1/responses/resp_%00x"),
     ("POST", "/v1/batches/batch_%00/cancel"), ("GET", "/v1/models/m%00")],
)
def test_a_nul_in_the_path_is_a_400_naming_it(gateway: Gateway, method: str, path: str) -> None:
    """Like a query parameter's, an id in the path carried the NUL into a
    database lookup that PostgreSQL refused with a 500."""
    response = httpx.request(method, gateway.url + path, timeout=30,
                             headers={"Authorization": f"Bearer {gateway.api_key}"})
    error = assert_envelope(response, 400, param=None, code="invalid_value")
    assert f"'{path}'" in error["message"] and "NUL" in error["message"]


def test_a_query_without_a_nul_is_served_as_before(gateway: Gateway) -> None:
    # An encoded zero digit is not a NUL; %0A is a newline (not a file id).
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    assert httpx.get(gateway.url + "/v1/files?purpose=batch%30", timeout=30,
                     headers=headers).status_code == 200
    newline = httpx.get(gateway.url + "/v1/files?after=%0A", timeout=30, headers=headers)
    assert_envelope(newline, 400, param="after", code="invalid_value")
    assert "no file with id" in newline.json()["error"]["message"]
