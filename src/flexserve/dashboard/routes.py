"""``/dashboard``: an organization's page, after signing in with its admin key.

GET /dashboard shows the sign-in form, or the organization's page for a
session; POST /dashboard/login opens a session (``sessions.py``); POST
/dashboard/logout ends it. Every answer forbids caching, framing and any
script (its Content-Security-Policy), and names no key.
"""

from __future__ import annotations

import secrets
import time
from urllib.parse import parse_qs

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from flexserve.api.state import Services
from flexserve.billing.reports import ReportQuery, cost_report, savings_report
from flexserve.dashboard.pages import STYLE, BatchRow, OrgView, login_page, org_page
from flexserve.dashboard.sessions import (
    COOKIE_PATH,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    Session,
    same_token,
)
from flexserve.store.schema import batches as batches_table

DAY = 86400
DAYS = 30
MAX_FORM_BYTES = 4096
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; img-src 'self'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _html(body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status_code, headers=HEADERS)


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    return {name: values[0] for name, values in parse_qs(body.decode("utf-8", "replace")).items()}


def _login(request: Request, error: str | None = None, status_code: int = 200) -> Response:
    """The sign-in form, with a fresh double-submit CSRF token in a cookie."""
    token = secrets.token_urlsafe(32)
    response = _html(login_page(token, error), status_code)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=_secure(request), max_age=3600)
    return response


async def style(request: Request) -> Response:
    return Response(STYLE, media_type="text/css", headers=HEADERS)


async def dashboard(request: Request) -> Response:
    services = _services(request)
    session = services.sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return _login(request)
    return _html(org_page(await org_view(services, session), session.csrf))


async def login(request: Request) -> Response:
    services = _services(request)
    form = await _form(request)
    if not same_token(form.get("csrf"), request.cookies.get(LOGIN_CSRF_COOKIE)):
        return _login(request, "The form expired; sign in again.", 403)
    principal = await services.keys.principal(form.get("key", "").strip())
    if principal is None or not principal.is_admin:
        return _login(request, "That is not an active admin key of an organization.", 403)
    sid, session = services.sessions.open(principal.org_id, principal.org_name)
    response = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
    response.set_cookie(SESSION_COOKIE, sid, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=_secure(request), max_age=int(services.sessions.ttl))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=COOKIE_PATH)
    return response


async def logout(request: Request) -> Response:
    services = _services(request)
    sid = request.cookies.get(SESSION_COOKIE)
    session = services.sessions.get(sid)
    form = await _form(request)
    if session is None or not same_token(form.get("csrf"), session.csrf):
        return _html("<!doctype html><p>Refused: no session, or a forged form.</p>", 403)
    services.sessions.close(sid)
    response = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


async def org_view(services: Services, session: Session, now: float | None = None) -> OrgView:
    """The organization's last ``DAYS`` UTC days, from the ledger (the costs API's figures)."""
    today = int(now if now is not None else time.time()) // DAY * DAY
    origin = today - (DAYS - 1) * DAY
    query = ReportQuery(session.org_id, origin=origin, width=DAY, start=origin, end=today + DAY)
    per_day = dict.fromkeys(range(origin, today + DAY, DAY), 0)
    by_model_tier: dict[tuple[str, str], int] = {}
    for row in await cost_report(services.db, query):
        pico = row.sums["input_cost"] + row.sums["cached_input_cost"] + row.sums["output_cost"]
        per_day[row.bucket_start] += pico
        key = (str(row.keys["model"]), str(row.keys["service_tier"]))
        by_model_tier[key] = by_model_tier.get(key, 0) + pico
    savings: dict[str, tuple[int, int]] = {}
    for row in await savings_report(services.db, query):
        tier = str(row.keys["service_tier"])
        cost, listed = savings.get(tier, (0, 0))
        savings[tier] = (cost + row.sums["cost"], listed + row.sums["list_cost"])
    return OrgView(
        org_name=session.org_name, days=DAYS, daily=sorted(per_day.items()),
        by_model_tier=[(m, t, p) for (m, t), p in sorted(by_model_tier.items())],
        savings=[(tier, cost, listed) for tier, (cost, listed) in sorted(savings.items())],
        batches=await recent_batches(services, session.org_id),
    )


async def recent_batches(services: Services, org_id: str, limit: int = 20) -> list[BatchRow]:
    """The organization's latest batches, newest first, with their progress and cost so far."""
    b = batches_table
    statement = (select(b.c.id, b.c.status, b.c.total, b.c.completed, b.c.failed, b.c.cost_pico)
                 .where(b.c.org_id == org_id).order_by(b.c.created_at.desc(), b.c.id).limit(limit))
    async with services.db.engine.connect() as conn:
        rows = (await conn.execute(statement)).all()
    return [BatchRow(row.id, row.status, row.total, row.completed, row.failed, row.cost_pico) for row in rows]
