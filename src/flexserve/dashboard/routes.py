"""``/dashboard``: an organization's page, after signing in with its admin
key, or the operator's, after signing in with an operator's key.

GET /dashboard shows the sign-in form, or the session's page; POST
/dashboard/login opens a session (``sessions.py``); POST /dashboard/logout
ends it; POST /dashboard/verification/approve and …/reject decide an
organization's verification (operators only, audited as ``operator:NAME``).
Every answer forbids caching, framing and any script (its
Content-Security-Policy), and names no key.
"""

from __future__ import annotations

import secrets
from html import escape
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from flexserve.accounts import AccountError
from flexserve.accounts.operators import Operators, is_operator_key
from flexserve.api.state import Services
from flexserve.dashboard.operator import operator_view
from flexserve.dashboard.operator_page import operator_page
from flexserve.dashboard.org import org_view
from flexserve.dashboard.pages import STYLE, login_page, org_page, page
from flexserve.dashboard.sessions import (
    COOKIE_PATH,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    same_token,
)

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
    if session.operator is not None:
        return _html(operator_page(await operator_view(services, session.operator), session.csrf))
    return _html(org_page(await org_view(services, session), session.csrf))


async def login(request: Request) -> Response:
    services = _services(request)
    form = await _form(request)
    if not same_token(form.get("csrf"), request.cookies.get(LOGIN_CSRF_COOKIE)):
        return _login(request, "The form expired; sign in again.", 403)
    key = form.get("key", "").strip()
    if is_operator_key(key):
        operator = await Operators(services.db).authenticate(key)
        if operator is None:
            return _login(request, "That is not an active operator's key.", 403)
        sid, session = services.sessions.open("", "", operator=operator)
    else:
        principal = await services.keys.principal(key)
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


async def decide_verification(request: Request) -> Response:
    """An operator's approval or rejection of an organization's verification,
    from the verification queue's forms."""
    services = _services(request)
    session = services.sessions.get(request.cookies.get(SESSION_COOKIE))
    form = await _form(request)
    if session is None or session.operator is None or not same_token(form.get("csrf"), session.csrf):
        return _html("<!doctype html><p>Refused: no operator's session, or a forged form.</p>", 403)
    org, reason = form.get("org", "").strip(), form.get("reason", "").strip()
    actor = f"operator:{session.operator}"
    try:
        if request.url.path.endswith("/approve"):
            await services.verifications.verify(org, actor=actor)
        elif reason:
            await services.verifications.reject(org, reason, actor=actor)
        else:
            raise AccountError("A rejection needs a reason: the organization's admins are shown it.")
    except AccountError as exc:
        return _html(page("FlexServe: refused", f"<p class=\"error\">{escape(str(exc))}</p>"
                          '<p><a href="/dashboard">Back to the dashboard</a></p>'), 400)
    return RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
