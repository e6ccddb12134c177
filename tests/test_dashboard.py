"""/dashboard over HTTP: signing in with an admin key, the session cookie's
flags, CSRF on every form, the Content-Security-Policy, expiry and sign-out;
the organization's page shows the costs API's figures and no one else's.
(In a real browser: tests/test_dashboard_browser.py.)"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import httpx
import pytest

from billing_support import priced_sim_gateway, Org, cli, ledger, new_org
from conftest import Gateway, wait_for

MODEL = "llama3-8b-sim-h100"
MESSAGES = [{"role": "user", "content": "Label this record."}]


@pytest.fixture(scope="module")
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return priced_sim_gateway(start_gateway, dashboard_session_seconds=2.0)


def browser(gateway: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, timeout=30)


def sign_in(web: httpx.Client, key: str) -> httpx.Response:
    form = web.get("/dashboard")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf is not None
    return web.post("/dashboard/login", data={"key": key, "csrf": csrf.group(1)})


def page_total(page: str) -> int:
    found = re.search(r'id="total">Total: <span class="amount" data-pico="(\d+)"', page)
    assert found is not None, page[:2000]
    return int(found.group(1))


def test_signing_in_opens_a_strict_session_and_the_page_shows_the_costs_apis_figures(gateway: Gateway) -> None:
    org = new_org(gateway, "dash-a")
    for tier in ("default", "flex"):
        org.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                             service_tier=tier)  # type: ignore[arg-type]
    wait_for(lambda: len(ledger(gateway, "org_id = (SELECT id FROM organizations WHERE name = :name)",
                                name="dash-a")) == 2)  # written by the usage writer, in the background
    with browser(gateway) as web:
        login_form = web.get("/dashboard")
        assert login_form.status_code == 200 and 'name="key"' in login_form.text
        assert "default-src 'none'" in login_form.headers["content-security-policy"]
        signed_in = sign_in(web, org.key)
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
        cookie = signed_in.headers["set-cookie"]
        assert "fs_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Path=/dashboard" in cookie and "Secure" not in cookie  # plain HTTP here
        page = web.get("/dashboard")
    assert page.status_code == 200 and "dash-a" in page.text
    assert org.key not in page.text and org.key not in str(page.url)
    # The figures the organization's costs API gives for the same days.
    costs = httpx.get(f"{gateway.url}/v1/organization/costs",
                      params={"start_time": int(time.time()) // 86400 * 86400 - 29 * 86400, "limit": 30},
                      headers={"Authorization": f"Bearer {org.key}"}).json()
    api_total = sum(round(result["amount"]["value"] * 1e12) for bucket in costs["data"]
                    for result in bucket["results"])
    assert page_total(page.text) == api_total > 0
    # Flex cost half of default for the same tokens: a saving shown.
    assert re.search(r"<tr><td>flex</td>", page.text)


def test_forms_without_their_csrf_token_are_refused(gateway: Gateway) -> None:
    org = new_org(gateway, "dash-b")
    with browser(gateway) as web:
        web.get("/dashboard")
        forged = web.post("/dashboard/login", data={"key": org.key, "csrf": "forged"})
        assert forged.status_code == 403 and "fs_session" not in forged.headers.get("set-cookie", "")
        assert sign_in(web, org.key).status_code == 303
        refused = web.post("/dashboard/logout", data={"csrf": "forged"})
        assert refused.status_code == 403
        assert "dash-b" in web.get("/dashboard").text  # still signed in
        page = web.get("/dashboard").text
        token = re.search(r'action="/dashboard/logout">\s*<input type="hidden" name="csrf" value="([^"]+)"', page)
        assert token is not None
        assert web.post("/dashboard/logout", data={"csrf": token.group(1)}).status_code == 303
        assert 'name="key"' in web.get("/dashboard").text  # signed out


def test_only_an_admin_key_opens_a_session_and_a_session_shows_only_its_organization(gateway: Gateway) -> None:
    mine, other = new_org(gateway, "dash-c"), new_org(gateway, "dash-d")
    other.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    member_key = cli(gateway.db_url, "keys", "create", "--org", "dash-c").strip()  # not an admin
    with browser(gateway) as web:
        assert sign_in(web, member_key).status_code == 403
        assert sign_in(web, "sk-fs-not-a-key").status_code == 403
        assert sign_in(web, mine.key).status_code == 303
        page = web.get("/dashboard").text
    assert "dash-c" in page and "dash-d" not in page
    assert page_total(page) == 0  # the other organization's spend is not here


def test_the_page_lists_the_organizations_batches_with_their_progress(gateway: Gateway) -> None:
    org = new_org(gateway, "dash-f")
    lines = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}}) + "\n"
                    for i in range(2))
    client = org.client()
    uploaded = client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).status == "completed", timeout=60)
    done = client.batches.retrieve(batch.id)
    with browser(gateway) as web:
        assert sign_in(web, org.key).status_code == 303
        page = web.get("/dashboard").text
    [row] = re.findall(rf"<tr><td>{batch.id}</td><td>(\w+)</td><td>(\d+) / (\d+)</td><td>(\d+)</td>"
                       r'<td class="amount" data-pico="(\d+)">', page)
    assert row[:4] == ("completed", "2", "2", "0")
    assert done.request_counts is not None and done.request_counts.completed == 2
    assert int(row[4]) > 0  # priced: the lines cost something


def test_a_session_expires(gateway: Gateway) -> None:
    org: Org = new_org(gateway, "dash-e")
    with browser(gateway) as web:
        assert sign_in(web, org.key).status_code == 303
        assert "dash-e" in web.get("/dashboard").text
        time.sleep(2.2)  # dashboard_session_seconds=2
        assert 'name="key"' in web.get("/dashboard").text


def test_no_session_without_a_cookie_and_no_script_allowed(gateway: Gateway) -> None:
    page = httpx.get(f"{gateway.url}/dashboard", cookies={"fs_session": "made-up"})
    assert 'name="key"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src" not in policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    style = httpx.get(f"{gateway.url}/dashboard/style.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
