"""/dashboard for operators (over HTTP): an operator's key from the CLI
opens the operator's page; its figures are the organizations' own costs API
figures and this gateway's requests; it decides verifications with CSRF-
protected forms, audited; organizations' sessions and revoked keys cannot.
Also the organization page's budget, rate-limit and flex-hour sections."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import httpx
import pytest

from billing_support import priced_sim_gateway, Org, cli, ledger, new_org
from conftest import Gateway, wait_for
from test_dashboard import MESSAGES, MODEL, browser, page_total, sign_in

DAY = 86400


@pytest.fixture(scope="module")
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    """A gateway of the module's own: the operator's page shows every organization in its database."""
    return priced_sim_gateway(start_gateway, dashboard_sample_seconds=0.2)


def operator_key(gateway: Gateway, name: str = "ops-alice") -> str:
    out = cli(gateway.db_url, "operators", "create", name)
    key = out.strip().splitlines()[-1]
    assert key.startswith("fs-op-"), out
    return key


def costs_total(org: Org) -> int:
    costs = org.get("/v1/organization/costs", start_time=int(time.time()) // DAY * DAY - 29 * DAY, limit=30)
    assert costs.status_code == 200, costs.text
    return sum(round(result["amount"]["value"] * 1e12) for bucket in costs.json()["data"]
               for result in bucket["results"])


def amount(page: str, element_id: str) -> int:
    found = re.search(rf'id="{element_id}">[^<]*<span class="amount" data-pico="(\d+)"', page)
    assert found is not None, page[:3000]
    return int(found.group(1))


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


def ask(org: Org, tier: str, n: int = 1) -> None:
    for _ in range(n):
        org.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                             service_tier=tier)  # type: ignore[arg-type]


def test_the_operators_page_shows_every_organizations_costs_api_figures_and_this_gateways_requests(
    gateway: Gateway,
) -> None:
    a, b = new_org(gateway, "op-a"), new_org(gateway, "op-b")
    ask(a, "default", 3)
    ask(a, "flex", 2)
    ask(b, "default", 1)
    wait_for(lambda: len(ledger(gateway)) >= 6)
    with browser(gateway) as web:
        assert sign_in(web, operator_key(gateway)).status_code == 303
        wait_for(lambda: "Not enough samples" not in web.get("/dashboard").text)
        page = web.get("/dashboard").text
    assert "FlexServe operator" in page and "ops-alice" in page
    # Every organization's charge: the sum of their own costs APIs.
    assert amount(page, "revenue") == costs_total(a) + costs_total(b) > 0
    for org in (a, b):
        [row] = re.findall(rf'<tr data-org="[^"]+"><td>{org.name}</td><td>\w+</td><td>(\d+)</td><td>\d+</td>'
                           r'<td class="amount" data-pico="(\d+)">[^<]*</td><td class="amount" data-pico="(\d+)">',
                           page)
        assert int(row[1]) == costs_total(org)
        # Flex is half price: only op-a, with two flex requests, saved.
        assert (int(row[2]) > 0) == (org is a)
    assert re.search(r'<td>op-a</td><td>\w+</td><td>5</td>', page)
    assert re.search(r'<td>op-b</td><td>\w+</td><td>1</td>', page)
    # Flex half price: op-a saved what its two flex requests would have cost more.
    # This gateway's last hour: four defaults timed, two flex waits.
    [ttft_count] = re.findall(r"<tr><td>TTFT</td><td>(\d+)</td>", page)
    assert int(ttft_count) == 4
    assert "Flex waits, last hour (2 served)" in page
    # The engine's chart, by tier, and spare capacity now.
    assert 'aria-label="Sequences on' in page and 'id="spare"' in page and MODEL in page


def test_an_operator_approves_and_rejects_verifications_from_the_page(gateway: Gateway) -> None:
    pending = [new_org(gateway, name) for name in ("op-verify-1", "op-verify-2")]
    for i, org in enumerate(pending):
        sent = org.post("/v1/organization/verification",
                        {"document_type": "passport", "country": "FR", "number": f"AB{i}123456"})
        assert sent.status_code == 200, sent.text
    with browser(gateway) as web:
        assert sign_in(web, operator_key(gateway, "ops-bob")).status_code == 303
        page = web.get("/dashboard").text
        for org in pending:
            assert f"<tr><td>{org.name}</td><td>passport</td><td>FR</td>" in page
        token = csrf_of(page)
        forged = web.post("/dashboard/verification/approve", data={"org": "op-verify-1", "csrf": "forged"})
        assert forged.status_code == 403
        no_reason = web.post("/dashboard/verification/reject", data={"org": "op-verify-2", "csrf": token})
        assert no_reason.status_code == 400 and "reason" in no_reason.text
        assert web.post("/dashboard/verification/approve",
                        data={"org": "op-verify-1", "csrf": token}).status_code == 303
        assert web.post("/dashboard/verification/reject",
                        data={"org": "op-verify-2", "reason": "blurred scan", "csrf": token}).status_code == 303
        unknown = web.post("/dashboard/verification/approve", data={"org": "no-such-org", "csrf": token})
        assert unknown.status_code == 400
        page = web.get("/dashboard").text
    assert "op-verify-1</td><td>passport" not in page and "op-verify-2</td><td>passport" not in page
    first = pending[0].get("/v1/organization/verification").json()
    second = pending[1].get("/v1/organization/verification").json()
    assert first["status"] == "verified"
    assert second["status"] == "rejected" and "blurred scan" in str(second)
    audit = cli(gateway.db_url, "orgs", "audit", "op-verify-1")
    assert "operator:ops-bob" in audit


def test_only_an_operators_session_decides_and_a_revoked_operator_key_opens_none(gateway: Gateway) -> None:
    org = new_org(gateway, "op-c")
    org.post("/v1/organization/verification", {"document_type": "passport", "country": "DE",
                                               "number": "CD7654321"})
    with browser(gateway) as web:
        assert sign_in(web, org.key).status_code == 303
        page = web.get("/dashboard").text
        assert "FlexServe operator" not in page and "op-c" in page
        refused = web.post("/dashboard/verification/approve", data={"org": "op-c", "csrf": csrf_of(page)})
        assert refused.status_code == 403
    assert org.get("/v1/organization/verification").json()["status"] == "pending"
    key = operator_key(gateway, "ops-carol")
    [key_id] = re.findall(r"(opk_\S+)\s+ops-carol", cli(gateway.db_url, "operators", "list"))
    cli(gateway.db_url, "operators", "revoke", key_id)
    with browser(gateway) as web:
        assert sign_in(web, key).status_code == 403
        assert sign_in(web, "fs-op-made-up").status_code == 403
    # An operator's key is for the dashboard only: the API does not take it.
    assert httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_the_organizations_page_shows_its_budget_rate_limit_headroom_and_flex_hour(gateway: Gateway) -> None:
    org = new_org(gateway, "op-d")
    cli(gateway.db_url, "orgs", "set-budget", "op-d", "--monthly-usd", "2.50")
    cli(gateway.db_url, "orgs", "set-rate-limit", "op-d", "--tier", "default", "--rpm", "2")
    time.sleep(0.3)  # policy_refresh_interval=0.1: the gateway has the limits
    ask(org, "default", 2)
    with pytest.raises(Exception, match="429|rate"):
        ask(org, "default", 1)  # the third in a minute
    ask(org, "flex", 3)
    wait_for(lambda: len(ledger(gateway, "org_id = (SELECT id FROM organizations WHERE name = :name)", name="op-d")) == 5)
    with browser(gateway) as web:
        assert sign_in(web, org.key).status_code == 303
        page = web.get("/dashboard").text
    assert amount(page, "budget") == page_total(page) == costs_total(org) > 0
    assert re.search(r'of a budget of <span class="amount" data-pico="2500000000000">', page)
    assert "<tr><td>default</td><td>2 / 2</td><td>0</td>" in page  # no request left this minute
    assert re.search(r'<table id="flex-hour">.*?<tr><td>3</td><td>0</td><td>0%</td>', page, re.S)


def test_the_operators_page_shows_the_last_plan_written_to_the_gateways_home(gateway: Gateway) -> None:
    with browser(gateway) as web:
        assert sign_in(web, operator_key(gateway, "ops-dave")).status_code == 303
        assert "No plan yet" in web.get("/dashboard").text
        out = cli(gateway.db_url, "plan", "--home", gateway.settings.home, "--max-num-seqs", "8", "--window", "3",
                  "--warmup", "1", "--levels", "1", "--peak-rps", "1", "--trough", "1")
        assert "report:" in out
        page = web.get("/dashboard").text
    planned = re.search(r'<span id="plan-flex">([\d,]+)</span>', page)
    assert planned is not None and int(planned.group(1).replace(",", "")) > 0
    assert 'aria-label="Flex output tokens sellable per hour"' in page
