"""Who is calling: API key → principal, with a short-lived in-memory cache.

A cached answer lives ``ttl`` seconds, so a revoked key is refused within that
time while the request path almost never touches the database: past half its
life a hit starts a refresh in the background, so under steady traffic no
request waits for the database at all, and concurrent misses of one key share
a single lookup instead of each querying. Unknown keys are cached too
(briefly), so a client hammering with a bad key costs no database round-trips.
The key itself is never logged, echoed or kept: the cache is keyed by its hash.

While the database is away (a PostgreSQL restart, a failover), a key whose
answer expired less than ``stale_grace`` seconds ago keeps its last answer:
requests of known clients go on, and revocation takes up to ``ttl +
stale_grace`` for that long. A key not seen within that time gets a 503
asking to retry, never a 500.

A request with more than one ``Authorization`` header is refused before any
route sees it (``ambiguous_authorization``, checked by the app): frameworks
and proxies disagree on which copy counts (Starlette's headers take the
first, a dict of them the last), so such a request does not say who sends it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.requests import Request

from flexserve.accounts import Accounts, Principal
from flexserve.api.errors import database_unavailable
from flexserve.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal | None
    refresh_at: float  # monotonic time after which a hit starts a refresh
    expires_at: float  # monotonic time after which a hit no longer counts


class KeyCache:
    """Principal lookups by key hash, with expiry, refresh ahead and a size bound."""

    def __init__(
        self, accounts: Accounts, ttl: float = 5.0, max_entries: int = 100_000, stale_grace: float = 60.0
    ) -> None:
        self._accounts = accounts
        self._ttl = ttl
        self._stale_grace = stale_grace
        self._max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Lookups in flight, by key hash: one per key at a time.
        self._lookups: dict[str, asyncio.Task[Principal | None]] = {}
        # Bumped by forget(), so that a lookup begun before it stores nothing.
        self._generation = 0

    async def principal(self, api_key: str) -> Principal | None:
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and now < hit.expires_at:
            if now >= hit.refresh_at and digest not in self._lookups:
                self._start_lookup(digest, api_key)
            return hit.principal
        lookup = self._lookups.get(digest) or self._start_lookup(digest, api_key)
        try:
            # Shielded: a caller that goes away does not cancel the others' lookup.
            return await asyncio.shield(lookup)
        except Exception as exc:
            if hit is None or now >= hit.expires_at + self._stale_grace or not database_unavailable(exc):
                raise
            return hit.principal

    def _start_lookup(self, digest: str, api_key: str) -> asyncio.Task[Principal | None]:
        task = asyncio.get_running_loop().create_task(self._lookup(digest, api_key))
        self._lookups[digest] = task
        # A background refresh may fail with nobody awaiting it: the next miss retries.
        task.add_done_callback(_retrieve_exception)
        return task

    async def _lookup(self, digest: str, api_key: str) -> Principal | None:
        generation, started = self._generation, time.monotonic()
        try:
            principal = await self._accounts.authenticate(api_key)
        finally:
            if self._lookups.get(digest) is asyncio.current_task():
                del self._lookups[digest]
        if generation == self._generation:
            # Its life counts from the query, not the answer: what the database said then.
            self._entries[digest] = _Entry(principal, started + self._ttl / 2, started + self._ttl)
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return principal

    def forget(self) -> None:
        self._generation += 1
        self._entries.clear()
        self._lookups.clear()


def _retrieve_exception(task: asyncio.Task[Principal | None]) -> None:
    if not task.cancelled():
        task.exception()


def ambiguous_authorization(headers: Iterable[tuple[bytes, bytes]]) -> InvalidRequestError | None:
    """The 400 for an ASGI request that carries ``Authorization`` more than
    once (header names arrive lower-cased), or None."""
    seen = False
    for name, _ in headers:
        if name == b"authorization":
            if seen:
                return InvalidRequestError(
                    "The request has more than one Authorization header; send exactly one "
                    "('Authorization: Bearer YOUR_KEY').",
                    param="Authorization",
                    code="invalid_header",
                )
            seen = True
    return None


def bearer_key(authorization: str | None) -> str:
    """The key in an ``Authorization: Bearer …`` header value."""
    if not authorization:
        raise AuthenticationError(
            "You didn't provide an API key. Send it in the Authorization header "
            "as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationError(
            "Malformed Authorization header: expected 'Bearer YOUR_KEY'.", code="invalid_api_key"
        )
    return key


async def principal_of(authorization: str | None, cache: KeyCache) -> Principal:
    """Who sends ``authorization`` (the header's value), or 401."""
    principal = await cache.principal(bearer_key(authorization))
    if principal is None:
        # Never echo the key, not even masked: error bodies end up in logs.
        raise AuthenticationError("Incorrect or revoked API key provided.")
    return principal


async def authenticate(request: Request, cache: KeyCache) -> Principal:
    return await principal_of(request.headers.get("authorization"), cache)


async def authenticate_admin(request: Request, cache: KeyCache) -> Principal:
    principal = await authenticate(request, cache)
    if not principal.is_admin:
        raise PermissionDeniedError(
            "This endpoint needs an admin key of the organization "
            "(create one with `flexserve keys create --org NAME --admin`).",
            code="insufficient_permissions",
        )
    return principal
