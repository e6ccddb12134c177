"""Dashboard sessions: a key exchanged once for a cookie, CSRF tokens.

Login takes an organization's admin key, or an operator's key
(``accounts.operators``), from a form (never a URL) and
answers with a session cookie: ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page sends it), ``Secure`` when the
request came over TLS, scoped to ``/dashboard``, expiring with the session.
The key itself is not kept: the session holds the organization it opened,
or the operator's name.

Every form carries a CSRF token: before login, the double-submit kind (a
random cookie the form repeats); after it, the session's own token. A
mismatch is refused (403).

Sessions live in this gateway's memory: a restart ends them, and behind a
load balancer a dashboard user needs sticky sessions (or to log in again
on another gateway). They expire ``dashboard_session_seconds`` after login;
logout ends one at once. Revoking the key does not end a session already
open: it lasts at most its expiry.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

SESSION_COOKIE = "fs_session"
LOGIN_CSRF_COOKIE = "fs_login_csrf"
COOKIE_PATH = "/dashboard"


@dataclass(frozen=True, slots=True)
class Session:
    org_id: str  # "" for an operator's session
    org_name: str
    csrf: str
    expires_at: float  # time.monotonic()
    operator: str | None = None  # the operator's name: the operator's view

    @property
    def is_operator(self) -> bool:
        return self.operator is not None


class Sessions:
    """The open sessions, by their cookie's value."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._open: dict[str, Session] = {}

    def open(self, org_id: str, org_name: str, *, operator: str | None = None) -> tuple[str, Session]:
        self._forget_expired()
        sid = secrets.token_urlsafe(32)
        session = Session(org_id, org_name, secrets.token_urlsafe(32), time.monotonic() + self.ttl,
                          operator)
        self._open[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._open.get(sid)
        if session is None:
            return None
        if time.monotonic() >= session.expires_at:
            del self._open[sid]
            return None
        return session

    def close(self, sid: str | None) -> None:
        if sid:
            self._open.pop(sid, None)

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self._open.items() if now >= s.expires_at]:
            del self._open[sid]

    def __len__(self) -> int:
        return len(self._open)


def same_token(sent: str | None, expected: str | None) -> bool:
    """A CSRF token as expected (constant time; empty never matches)."""
    return bool(sent) and bool(expected) and hmac.compare_digest(str(sent), str(expected))
