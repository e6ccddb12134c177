"""/dashboard in a real browser (headless Chromium, tests/browser.py): signing
in through the form, the organization's page against the costs API, the
session cookie as the browser keeps it, a wrong key, signing out; the
operator's page, its charts and its verification decisions; and on
every page, nothing in the console (no Content-Security-Policy violation,
no script error). Skipped where Chromium is not installed."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from billing_support import priced_sim_gateway, cli, new_org
from browser import browser_problems, forget_everything, new_driver, screenshot, sign_in, wait_for_page
from conftest import Gateway, sql_rows, wait_for
from flexserve.dashboard.routes import HEADERS

try:
    from selenium.webdriver.common.by import By
except ImportError:  # the fixture skips, or fails where a browser is required, saying so
    By = None

MODEL = "llama3-8b-sim-h100"
MESSAGES = [{"role": "user", "content": "Label this record."}]
NOT_AN_ADMIN_KEY = "That is not an active admin key of an organization."


@pytest.fixture(scope="module")
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return priced_sim_gateway(start_gateway)


@pytest.fixture(scope="session")
def chrome() -> Iterator[Any]:
    driver = new_driver()
    yield driver
    driver.quit()


@pytest.fixture
def driver(chrome: Any) -> Any:
    """The session's browser, as if new: no cookies, an empty console log."""
    forget_everything(chrome)
    return chrome


def on_sign_in_form(driver: Any) -> bool:
    return bool(driver.find_elements(By.CSS_SELECTOR, 'form[action="/dashboard/login"] input[name="key"]'))


def session_cookies(driver: Any) -> list[dict[str, Any]]:
    return [c for c in driver.get_cookies() if c["name"] == "fs_session"]


def costs_api_total(gateway: Gateway, key: str) -> int:
    """The organization's spend over the page's 30 UTC days, from the costs
    API, in the ledger's pico-dollars (as the page's ``data-pico``)."""
    costs = httpx.get(f"{gateway.url}/v1/organization/costs",
                      params={"start_time": int(time.time()) // 86400 * 86400 - 29 * 86400, "limit": 30},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert costs.status_code == 200, costs.text
    return sum(round(result["amount"]["value"] * 1e12) for bucket in costs.json()["data"]
               for result in bucket["results"])


def test_signing_in_through_the_form_shows_the_costs_apis_total(gateway: Gateway, driver: Any) -> None:
    org = new_org(gateway, "browser-a")
    client = org.client()
    for tier in ("default", "flex", "default"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                       service_tier=tier)  # type: ignore[arg-type]
    wait_for(lambda: len(sql_rows(  # written by the usage writer, in the background
        gateway.db_url, "SELECT u.id FROM usage_records u JOIN organizations o ON o.id = u.org_id "
        "WHERE o.name = :name", name="browser-a")) == 3)

    driver.get(f"{gateway.url}/dashboard")
    assert driver.title == "FlexServe: sign in" and on_sign_in_form(driver)
    # The stylesheet loaded (the policy allows it, from this origin only).
    muted = driver.find_element(By.CSS_SELECTOR, "p.muted")
    assert muted.value_of_css_property("color") in ("rgba(119, 119, 119, 1)", "rgb(119, 119, 119)")
    screenshot(driver, "dashboard-sign-in")

    sign_in(driver, gateway.url, org.key)
    assert driver.current_url == f"{gateway.url}/dashboard"  # the form's POST answered 303 to here
    assert driver.find_element(By.TAG_NAME, "h1").text == "browser-a"
    assert not on_sign_in_form(driver)
    total = driver.find_element(By.CSS_SELECTOR, "#total [data-pico]")
    assert int(total.get_attribute("data-pico")) == costs_api_total(gateway, org.key) > 0
    assert total.text.startswith("$")
    # Both tiers served, each in its row; flex's saving shown.
    tiers = [row.find_elements(By.TAG_NAME, "td")[1].text
             for row in driver.find_elements(By.CSS_SELECTOR, "#by-model-tier tr")[1:]]
    assert sorted(tiers) == ["default", "flex"]
    [saved] = driver.find_elements(By.CSS_SELECTOR, "#savings tr")[1:]
    cells = saved.find_elements(By.TAG_NAME, "td")
    assert cells[0].text == "flex" and int(cells[3].get_attribute("data-pico")) > 0
    # The chart: a bar per day for 30 days, today's drawn.
    chart = driver.find_element(By.CSS_SELECTOR, 'svg[aria-label="Spend per day"]')
    bars = chart.find_elements(By.TAG_NAME, "rect")
    assert chart.is_displayed() and len(bars) == 30 and float(bars[-1].get_attribute("height")) > 0
    screenshot(driver, "dashboard-organization")
    assert browser_problems(driver) == []


def test_the_browser_keeps_an_httponly_strict_session_and_the_key_nowhere(
        gateway: Gateway, driver: Any) -> None:
    org = new_org(gateway, "browser-b")
    sign_in(driver, gateway.url, org.key)
    assert driver.find_element(By.TAG_NAME, "h1").text == "browser-b"
    [cookie] = session_cookies(driver)
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/dashboard" and cookie["secure"] is False  # plain HTTP here
    assert "fs_login_csrf" not in {c["name"] for c in driver.get_cookies()}  # spent at sign-in
    driver.refresh()  # a GET (the sign-in answered 303): nothing sent again
    assert driver.find_element(By.TAG_NAME, "h1").text == "browser-b"
    assert org.key not in driver.current_url and org.key not in driver.page_source
    assert all(org.key not in c["value"] for c in driver.get_cookies())
    # No script on the page can read the session (nor is there any script).
    assert "fs_session" not in driver.execute_script("return document.cookie")
    assert driver.find_elements(By.TAG_NAME, "script") == []
    assert browser_problems(driver) == []


def test_a_wrong_key_shows_the_error_and_opens_no_session(gateway: Gateway, driver: Any) -> None:
    org = new_org(gateway, "browser-c")
    member_key = cli(gateway.db_url, "keys", "create", "--org", "browser-c").strip()  # not an admin
    for key in ("sk-fs-not-a-key", member_key):
        sign_in(driver, gateway.url, key)
        assert driver.find_element(By.CSS_SELECTOR, "p.error").text == NOT_AN_ADMIN_KEY
        assert on_sign_in_form(driver)  # to try again
        assert session_cookies(driver) == []
        assert key not in driver.page_source and key not in driver.current_url
        # The form's own answer carries the policy too: nothing in the console.
        problems = browser_problems(driver)
        # Chromium reports the answer's 403 status as a failed load; nothing else.
        assert [p for p in problems if "status of 403" not in p["message"]] == [], problems
    driver.get(f"{gateway.url}/dashboard")
    assert on_sign_in_form(driver) and "browser-c" not in driver.page_source
    assert org.key not in driver.page_source


def test_signing_out_ends_the_session(gateway: Gateway, driver: Any) -> None:
    org = new_org(gateway, "browser-d")
    sign_in(driver, gateway.url, org.key)
    assert driver.find_element(By.TAG_NAME, "h1").text == "browser-d"
    [cookie] = session_cookies(driver)
    button = driver.find_element(By.CSS_SELECTOR, 'form[action="/dashboard/logout"] button[type="submit"]')
    assert button.text == "Sign out"
    button.click()
    wait_for_page(driver, button)
    assert on_sign_in_form(driver) and session_cookies(driver) == []
    driver.refresh()
    assert on_sign_in_form(driver) and "browser-d" not in driver.page_source
    # Ended on the gateway too, not only forgotten by the browser: the old cookie opens nothing.
    driver.add_cookie({"name": "fs_session", "value": cookie["value"], "path": "/dashboard"})
    driver.refresh()
    assert on_sign_in_form(driver) and "browser-d" not in driver.page_source
    assert browser_problems(driver) == []


@pytest.fixture(scope="module")
def busy_gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    """A slower sim engine, sampled often: the operator's charts have something to draw."""
    return priced_sim_gateway(start_gateway, speed=5.0, max_num_seqs=8, dashboard_sample_seconds=0.25,
                              org="ops-admin")


def test_an_operator_sees_the_engines_and_decides_verifications_in_the_browser(
        busy_gateway: Gateway, driver: Any) -> None:
    gateway = busy_gateway
    orgs = [new_org(gateway, name) for name in ("acme-labs", "enrich-co")]
    for org, number in zip(orgs, ("P1234567", "P7654321"), strict=True):
        sent = org.post("/v1/organization/verification",
                        {"document_type": "passport", "country": "FR", "number": number})
        assert sent.status_code == 200, sent.text

    def ask(org_index: int, tier: str, max_tokens: int) -> None:
        orgs[org_index].client().chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=max_tokens, service_tier=tier)  # type: ignore[arg-type]

    # Default and flex side by side, for a few seconds: the engine chart's tiers.
    work = [threading.Thread(target=ask, args=(i % 2, tier, 150 + 40 * i))
            for i, tier in enumerate(["default", "flex"] * 6)]
    for thread in work:
        thread.start()
        time.sleep(0.15)
    for thread in work:
        thread.join(timeout=120)
    key = cli(gateway.db_url, "operators", "create", "alice").strip().splitlines()[-1]
    sign_in(driver, gateway.url, key)
    assert driver.find_element(By.TAG_NAME, "h1").text == "FlexServe operator (alice)"
    # Each organization's row is its costs API's total.
    for org in orgs:
        [row] = [r for r in driver.find_elements(By.CSS_SELECTOR, "#orgs tr[data-org]")
                 if r.find_element(By.TAG_NAME, "td").text == org.name]
        charged = row.find_elements(By.TAG_NAME, "td")[4]
        assert int(charged.get_attribute("data-pico")) == costs_api_total(gateway, org.key) > 0
    # The engine's chart draws flex and default (areas with a tooltip each).
    chart = driver.find_element(By.CSS_SELECTOR, '#engines svg[aria-label^="Sequences on"]')
    tooltips = [t.get_attribute("textContent") for t in chart.find_elements(By.CSS_SELECTOR, "polygon title")]
    peaks = {t.split(":")[0]: float(t.rsplit("peak ", 1)[1]) for t in tooltips}
    assert peaks["default"] > 0 and peaks["flex"] > 0, peaks
    assert "Flex waits, last hour (6 served)" in driver.page_source
    screenshot(driver, "dashboard-operator")
    assert browser_problems(driver) == []

    # Approve the first document, reject the second with a reason typed in.
    rows = driver.find_elements(By.CSS_SELECTOR, "#verifications tr")[1:]
    assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == ["acme-labs", "enrich-co"]
    approve = rows[0].find_element(By.CSS_SELECTOR, 'form[action$="/approve"] button')
    approve.click()
    wait_for_page(driver, approve)
    [row] = driver.find_elements(By.CSS_SELECTOR, "#verifications tr")[1:]
    row.find_element(By.CSS_SELECTOR, 'input[name="reason"]').send_keys("the scan is unreadable")
    reject = row.find_element(By.CSS_SELECTOR, 'form[action$="/reject"] button')
    reject.click()
    wait_for_page(driver, reject)
    assert driver.find_element(By.ID, "verifications").text == "No document is waiting."
    assert orgs[0].get("/v1/organization/verification").json()["status"] == "verified"
    rejected = orgs[1].get("/v1/organization/verification").json()
    assert rejected["status"] == "rejected" and "the scan is unreadable" in str(rejected)
    assert browser_problems(driver) == []


class _Violating(http.server.BaseHTTPRequestHandler):
    """A page under the dashboard's own headers with what they forbid: an
    inline script and an inline style."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = (b'<!doctype html><html><head><title>violating</title></head><body>'
                b'<p style="color: red">styled</p><script>document.title = "ran";</script></body></html>')
        self.send_response(200)
        for name, value in HEADERS.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_console_log_shows_a_content_security_policy_violation(driver: Any) -> None:
    """The check the tests above make sees a violation when there is one."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Violating)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        assert driver.title == "violating"  # the script did not run
        problems = browser_problems(driver)
    finally:
        server.shutdown()
        server.server_close()
    # Chromium's words: "Executing inline script violates the following Content Security
    # Policy directive 'default-src 'none''. ... The action has been blocked." (source "security").
    violations = [p["message"] for p in problems
                  if p["source"] == "security" and "Content Security Policy" in p["message"]]
    assert any("Executing inline script" in m for m in violations), problems
    assert any("Applying inline style" in m for m in violations), problems
