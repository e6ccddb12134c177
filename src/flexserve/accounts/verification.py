"""Organization verification: documents, decisions, the 90-day rule, the audit log.

An organization is ``unverified`` until an admin submits an identity document
(``submit``: it becomes ``pending``); an operator then decides (``verify`` or
``reject``). One document verifies only one organization per 90 days: a
document that verified another organization within that window is rejected,
at submission or when the operator tries to verify, with that reason.

The document number is never stored. To find the same document again without
it, FlexServe stores a *keyed, deterministic* hash of (type, country, number):
scrypt with a random 32-byte key the server generates once and keeps in the
database (``server_secrets``) as its salt. A per-row random salt would make
the hashes of one document differ, so the 90-day rule could only be checked
by re-hashing the number against every stored row; the server-wide key keeps
it one indexed lookup. Without the key the hashes cannot be tested against
guesses, and scrypt makes each guess costly even for someone who has the
database (document numbers are short, so a fast hash would not do). The
hash is made on a ``HashPool``: its own thread, a bounded queue, 503 past it.

Every submission and decision is appended to the audit log in the same
transaction as the change.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from flexserve.accounts.hash_pool import HashPool
from flexserve.accounts.service import AccountError, new_id
from flexserve.store.audit import SYSTEM_ACTOR, append_audit
from flexserve.store.database import Database
from flexserve.store.schema import organizations, server_secrets, verification_requests

DOCUMENT_TYPES = ("passport", "national_id", "drivers_license")
REUSE_WINDOW_DAYS = 90
REUSE_WINDOW = REUSE_WINDOW_DAYS * 86_400
_SECRET_NAME = "verification_document_key"
_COUNTRY = re.compile(r"[A-Z]{2}")
_NUMBER = re.compile(r"[A-Z0-9]{4,32}")
# scrypt's cost: 128·r·n bytes (16 MiB) and a few tens of milliseconds per hash.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32, "maxmem": 64 * 1024 * 1024}


class VerificationError(AccountError):
    """A submission or decision that cannot be made; ``param`` names the bad field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class VerificationRequest:
    id: str
    org_id: str
    document_type: str
    country: str
    status: str  # pending, verified, rejected, superseded
    reason: str | None  # why it was rejected
    submitted_at: int
    decided_at: int | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of ``verify`` or ``reject``."""

    org_id: str
    status: str  # the organization's status now: verified or rejected
    reason: str | None
    request: VerificationRequest | None  # None: decided without a document


def normalize_document(document_type: str, country: str, number: str) -> tuple[str, str, str]:
    """The document's fields in one canonical spelling, or VerificationError."""
    if document_type not in DOCUMENT_TYPES:
        raise VerificationError(
            f"Invalid 'document_type': {document_type!r}. Use one of: "
            + ", ".join(DOCUMENT_TYPES)
            + ".",
            "document_type",
        )
    country_code = country.strip().upper()
    if not _COUNTRY.fullmatch(country_code):
        raise VerificationError(
            f"Invalid 'country': {country!r}. Use the ISO 3166-1 alpha-2 code, such as 'FR'.",
            "country",
        )
    # "ab 12-34.56" and "AB123456" are the same document as printed and as typed.
    digits = re.sub(r"[\s.\-/]", "", number).upper()
    if not _NUMBER.fullmatch(digits):
        raise VerificationError("Invalid 'number': expected 4 to 32 letters and digits.", "number")
    return document_type, country_code, digits


def document_hash(key: bytes, document_type: str, country: str, number: str) -> str:
    """The keyed hash a document is stored and matched by (hex)."""
    material = f"{document_type}:{country}:{number}".encode()
    return hashlib.scrypt(material, salt=key, **_SCRYPT).hex()


class Verifications:
    """The verification workflow over the database."""

    def __init__(
        self,
        db: Database,
        clock: Callable[[], float] = time.time,
        hashes: HashPool | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._hashes = hashes if hashes is not None else HashPool()
        self._key: bytes | None = None
        # One first submission creates the key; the others wait for it
        # rather than all writing at once.
        self._key_lock = asyncio.Lock()

    async def submit(
        self, org_id: str, document_type: str, country: str, number: str, *, actor: str
    ) -> VerificationRequest:
        """Record a document for ``org_id``: pending, or rejected at once when
        it verified another organization within the window."""
        fields = normalize_document(document_type, country, number)
        key = await self._document_key()
        # 503 at once when the pool is full (nothing written, nothing to undo).
        digest = await self._hashes.run(lambda: document_hash(key, *fields))
        now = self._now()
        async with self._db.engine.begin() as conn:
            found = await _lock_org(conn, organizations.c.id == org_id)
            if found is None:
                raise VerificationError(f"no organization with id {org_id!r}")
            if found[1] == "verified":
                raise VerificationError("This organization is already verified.")
            # A new document replaces one still waiting for a decision.
            await conn.execute(
                update(verification_requests)
                .where(verification_requests.c.org_id == org_id)
                .where(verification_requests.c.status == "pending")
                .values(status="superseded", decided_at=now)
            )
            reuse = await _recent_verification_elsewhere(conn, digest, org_id, now)
            request = VerificationRequest(
                id=_request_id(),
                org_id=org_id,
                document_type=fields[0],
                country=fields[1],
                status="pending" if reuse is None else "rejected",
                reason=None if reuse is None else _reuse_reason(reuse),
                submitted_at=now,
                decided_at=None if reuse is None else now,
            )
            await conn.execute(
                insert(verification_requests).values(
                    id=request.id,
                    org_id=org_id,
                    document_type=request.document_type,
                    country=request.country,
                    document_hash=digest,
                    status=request.status,
                    reason=request.reason,
                    submitted_at=now,
                    decided_at=request.decided_at,
                )
            )
            await _set_status(conn, org_id, request.status)
            detail = {
                "request_id": request.id,
                "document_type": request.document_type,
                "country": request.country,
            }
            await append_audit(
                conn,
                actor=actor,
                action="verification.submitted",
                org_id=org_id,
                detail=detail,
                at=now,
            )
            if reuse is not None:
                await append_audit(
                    conn,
                    actor=SYSTEM_ACTOR,
                    action="verification.rejected",
                    org_id=org_id,
                    detail={
                        **detail,
                        "reason": request.reason,
                        "document_verified_org_id": reuse.org_id,
                    },
                    at=now,
                )
        return request

    async def verify(self, org_name: str, *, actor: str) -> Decision:
        """Approve the organization's pending document (or, with none, the
        organization itself). The 90-day rule may turn it into a rejection."""
        now = self._now()
        async with self._db.engine.begin() as conn:
            org_id = await _org_id_locked(conn, org_name)
            pending = await _pending(conn, org_id)
            if pending is None:
                await _set_status(conn, org_id, "verified")
                await append_audit(
                    conn,
                    actor=actor,
                    action="verification.verified",
                    org_id=org_id,
                    detail={"document": None},
                    at=now,
                )
                return Decision(org_id, "verified", None, None)
            reuse = await _recent_verification_elsewhere(conn, pending.document_hash, org_id, now)
            status = "verified" if reuse is None else "rejected"
            reason = None if reuse is None else _reuse_reason(reuse)
            request = await _decide(conn, pending, status, reason, now)
            detail: dict[str, object] = {"request_id": pending.id}
            if reuse is not None:
                detail |= {"reason": reason, "document_verified_org_id": reuse.org_id}
            await append_audit(
                conn,
                actor=actor,
                action=f"verification.{status}",
                org_id=org_id,
                detail=detail,
                at=now,
            )
            return Decision(org_id, status, reason, request)

    async def reject(self, org_name: str, reason: str, *, actor: str) -> Decision:
        """Turn the organization's pending document (or the organization) down."""
        reason = reason.strip()
        if not reason:
            raise VerificationError("a rejection needs a reason (--reason)")
        now = self._now()
        async with self._db.engine.begin() as conn:
            org_id = await _org_id_locked(conn, org_name)
            pending = await _pending(conn, org_id)
            request = None
            if pending is None:
                await _set_status(conn, org_id, "rejected")
            else:
                request = await _decide(conn, pending, "rejected", reason, now)
            await append_audit(
                conn,
                actor=actor,
                action="verification.rejected",
                org_id=org_id,
                detail={"request_id": None if pending is None else pending.id, "reason": reason},
                at=now,
            )
            return Decision(org_id, "rejected", reason, request)

    async def latest(self, org_id: str) -> VerificationRequest | None:
        """The organization's most recent submission, if any."""
        query = (
            select(verification_requests)
            .where(verification_requests.c.org_id == org_id)
            .order_by(
                verification_requests.c.submitted_at.desc(), verification_requests.c.id.desc()
            )
            .limit(1)
        )
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else _request(row)

    async def _document_key(self) -> bytes:
        if self._key is not None:
            return self._key
        async with self._key_lock:
            return await self._load_document_key()

    async def _load_document_key(self) -> bytes:
        if self._key is None:
            candidate = secrets.token_hex(32)
            try:
                async with self._db.engine.begin() as conn:
                    await conn.execute(
                        insert(server_secrets).values(
                            name=_SECRET_NAME, value=candidate, created_at=self._now()
                        )
                    )
            except IntegrityError:
                pass  # made before (by this or another process): use that one
            async with self._db.engine.connect() as conn:
                stored = (
                    await conn.execute(
                        select(server_secrets.c.value).where(server_secrets.c.name == _SECRET_NAME)
                    )
                ).scalar_one()
            self._key = bytes.fromhex(stored)
        return self._key

    def _now(self) -> int:
        return int(self._clock())


async def _lock_org(conn: AsyncConnection, where: ColumnElement[bool]) -> tuple[str, str] | None:
    """The organization's id and status, read after a write that takes
    SQLite's write lock first: a transaction that reads before it writes can
    fail at once when another connection writes in between."""
    result = await conn.execute(
        update(organizations).where(where).values(name=organizations.c.name)
    )
    if result.rowcount == 0:
        return None
    row = (
        await conn.execute(
            select(organizations.c.id, organizations.c.verification_status).where(where)
        )
    ).one()
    return str(row.id), str(row.verification_status)


async def _org_id_locked(conn: AsyncConnection, org_name: str) -> str:
    found = await _lock_org(conn, organizations.c.name == org_name)
    if found is None:
        raise VerificationError(f"no organization named {org_name!r}")
    return found[0]


async def _set_status(conn: AsyncConnection, org_id: str, status: str) -> None:
    await conn.execute(
        update(organizations).where(organizations.c.id == org_id).values(verification_status=status)
    )


async def _pending(conn: AsyncConnection, org_id: str) -> Row[Any] | None:
    query = (
        select(verification_requests)
        .where(verification_requests.c.org_id == org_id)
        .where(verification_requests.c.status == "pending")
        .order_by(verification_requests.c.submitted_at.desc(), verification_requests.c.id.desc())
        .limit(1)
    )
    return (await conn.execute(query)).first()


async def _decide(
    conn: AsyncConnection, pending: Row[Any], status: str, reason: str | None, now: int
) -> VerificationRequest:
    await conn.execute(
        update(verification_requests)
        .where(verification_requests.c.id == pending.id)
        .values(status=status, reason=reason, decided_at=now)
    )
    await _set_status(conn, str(pending.org_id), status)
    row = (
        await conn.execute(
            select(verification_requests).where(verification_requests.c.id == pending.id)
        )
    ).one()
    return _request(row)


@dataclass(frozen=True, slots=True)
class _Reuse:
    org_id: str
    decided_at: int


async def _recent_verification_elsewhere(
    conn: AsyncConnection, digest: str, org_id: str, now: int
) -> _Reuse | None:
    """The other organization this document verified within the window, if any."""
    query = (
        select(verification_requests.c.org_id, verification_requests.c.decided_at)
        .where(verification_requests.c.document_hash == digest)
        .where(verification_requests.c.status == "verified")
        .where(verification_requests.c.org_id != org_id)
        .where(verification_requests.c.decided_at > now - REUSE_WINDOW)
        .order_by(verification_requests.c.decided_at.desc())
        .limit(1)
    )
    row = (await conn.execute(query)).first()
    return None if row is None else _Reuse(str(row.org_id), int(row.decided_at))


def _request_id() -> str:
    """``vrq_`` + microseconds (hex, fixed width) + random: later ids sort
    later, so the latest of two submissions in one second is well defined."""
    return f"vrq_{time.time_ns() // 1000:014x}{new_id('')[:10]}"


def _reuse_reason(reuse: _Reuse) -> str:
    # The other organization is not named: this reason is shown to the submitter.
    until = datetime.datetime.fromtimestamp(reuse.decided_at + REUSE_WINDOW, tz=datetime.UTC)
    return (
        f"This document verified another organization within the last {REUSE_WINDOW_DAYS} days; "
        f"one document verifies only one organization per {REUSE_WINDOW_DAYS} days "
        f"(it can be used again after {until:%Y-%m-%d})."
    )


def _request(row: Row[Any]) -> VerificationRequest:
    return VerificationRequest(
        id=str(row.id),
        org_id=str(row.org_id),
        document_type=str(row.document_type),
        country=str(row.country),
        status=str(row.status),
        reason=None if row.reason is None else str(row.reason),
        submitted_at=int(row.submitted_at),
        decided_at=None if row.decided_at is None else int(row.decided_at),
    )
