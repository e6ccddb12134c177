"""Who is calling: API key → principal, with a short-lived in-memory cache.

A cached answer lives ``ttl`` seconds, so a revoked key is refused within that
time while the request path almost never touches the database. Unknown keys
are cached too (briefly), so a client hammering with a bad key costs no
database round-trips. The key itself is never logged, echoed or kept: the cache
is keyed by its hash.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

from starlette.requests import Request

from flexserve.accounts import Accounts, Principal
from flexserve.errors import AuthenticationError, PermissionDeniedError


class KeyCache:
    """Principal lookups by key hash, with expiry and a size bound."""

    def __init__(self, accounts: Accounts, ttl: float = 5.0, max_entries: int = 100_000) -> None:
        self._accounts = accounts
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()

    async def principal(self, api_key: str) -> Principal | None:
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = await self._accounts.authenticate(api_key)
        self._entries[digest] = (now + self._ttl, principal)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return principal

    def forget(self) -> None:
        self._entries.clear()


def bearer_key(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise AuthenticationError(
            "You didn't provide an API key. Send it in the Authorization header "
            "as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationError(
            "Malformed Authorization header: expected 'Bearer YOUR_KEY'.", code="invalid_api_key"
        )
    return key


async def authenticate(request: Request, cache: KeyCache) -> Principal:
    principal = await cache.principal(bearer_key(request))
    if principal is None:
        # Never echo the key, not even masked: error bodies end up in logs.
        raise AuthenticationError("Incorrect or revoked API key provided.")
    return principal


async def authenticate_admin(request: Request, cache: KeyCache) -> Principal:
    principal = await authenticate(request, cache)
    if not principal.is_admin:
        raise PermissionDeniedError(
            "This endpoint needs an admin key of the organization "
            "(create one with `flexserve keys create --org NAME --admin`).",
            code="insufficient_permissions",
        )
    return principal
