"""Organization verification: submission, decisions, the 90-day rule, the audit log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from flexserve.accounts import Accounts
from flexserve.accounts.gates import needs_verification
from flexserve.accounts.verification import (
    REUSE_WINDOW,
    VerificationError,
    Verifications,
    document_hash,
    normalize_document,
)
from flexserve.store import Database
from flexserve.store.audit import read_audit
from flexserve.store.schema import verification_requests

NUMBER = "X7Y6Z5W4"
DAY = 86_400


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def db(tmp_db_url: str) -> AsyncIterator[Database]:
    database = Database.from_url(tmp_db_url)
    await database.migrate()
    yield database
    await database.close()


async def org_ids(db: Database, *names: str) -> list[str]:
    accounts = Accounts(db)
    return [(await accounts.create_org(name)).id for name in names]


async def status(db: Database, name: str) -> str:
    return (await Accounts(db).get_org(name)).verification_status


async def test_submit_verify_and_the_audit_log(db: Database, tmp_db_url: str) -> None:
    (acme,) = await org_ids(db, "acme")
    workflow = Verifications(db)
    request = await workflow.submit(acme, "passport", "fr", NUMBER, actor="key:key_1")
    assert (request.status, request.country, request.reason) == ("pending", "FR", None)
    assert await status(db, "acme") == "pending"
    decision = await workflow.verify("acme", actor="cli:op")
    assert decision.status == "verified" and decision.request is not None
    assert decision.request.decided_at is not None
    assert await status(db, "acme") == "verified"
    with pytest.raises(VerificationError, match="already verified"):
        await workflow.submit(acme, "passport", "FR", NUMBER, actor="key:key_1")
    async with db.engine.connect() as conn:
        entries = await read_audit(conn, org_id=acme)
    assert [(e.actor, e.action) for e in entries] == [
        ("cli:op", "verification.verified"),
        ("key:key_1", "verification.submitted"),
    ]
    # The number is nowhere in the database, not even in the audit detail.
    raw = b"".join(
        p.read_bytes() for p in Path(tmp_db_url.removeprefix("sqlite:///")).parent.glob("*.db*")
    )
    assert NUMBER.encode() not in raw and NUMBER.lower().encode() not in raw


async def test_one_document_verifies_one_organization_per_90_days(db: Database) -> None:
    clock = Clock(1_750_000_000)
    first, second, third = await org_ids(db, "first", "second", "third")
    workflow = Verifications(db, clock)
    await workflow.submit(first, "national_id", "DE", NUMBER, actor="key:a")
    await workflow.verify("first", actor="cli:op")

    clock.now += 89 * DAY
    # The same document, typed differently: refused at once, with the reason.
    refused = await workflow.submit(second, "national_id", "de", "x7-y6 z5.w4", actor="key:b")
    assert refused.status == "rejected"
    assert (
        refused.reason is not None and "90 days" in refused.reason and "first" not in refused.reason
    )
    assert await status(db, "second") == "rejected"
    async with db.engine.connect() as conn:
        entries = await read_audit(conn, org_id=second)
    assert [(e.actor, e.action) for e in entries] == [
        ("system", "verification.rejected"),
        ("key:b", "verification.submitted"),
    ]
    assert entries[0].detail["document_verified_org_id"] == first

    clock.now += 2 * DAY  # 91 days after the first verification
    again = await workflow.submit(second, "national_id", "DE", NUMBER, actor="key:b")
    assert again.status == "pending"
    assert (await workflow.verify("second", actor="cli:op")).status == "verified"

    # A different document is no conflict.
    other = await workflow.submit(third, "passport", "DE", NUMBER, actor="key:c")
    assert other.status == "pending"


async def test_two_pending_with_one_document_only_the_first_decision_verifies(db: Database) -> None:
    one, two = await org_ids(db, "one", "two")
    workflow = Verifications(db)
    await workflow.submit(one, "passport", "US", NUMBER, actor="key:1")
    await workflow.submit(two, "passport", "US", NUMBER, actor="key:2")
    assert (await workflow.verify("one", actor="cli:op")).status == "verified"
    decision = await workflow.verify("two", actor="cli:op")
    assert decision.status == "rejected" and decision.reason and "90 days" in decision.reason
    assert await status(db, "two") == "rejected"
    async with db.engine.connect() as conn:
        stored = (
            (
                await conn.execute(
                    select(verification_requests.c.status).order_by(
                        verification_requests.c.submitted_at, verification_requests.c.org_id
                    )
                )
            )
            .scalars()
            .all()
        )
    assert sorted(stored) == ["rejected", "verified"]


async def test_reject_then_submit_again(db: Database) -> None:
    (acme,) = await org_ids(db, "acme")
    workflow = Verifications(db)
    first = await workflow.submit(acme, "drivers_license", "GB", "AB123456", actor="key:1")
    decision = await workflow.reject("acme", "The photo is unreadable.", actor="cli:op")
    assert decision.status == "rejected" and decision.request is not None
    assert decision.request.id == first.id and decision.request.reason == "The photo is unreadable."
    latest = await workflow.latest(acme)
    assert latest is not None and latest.status == "rejected"
    second = await workflow.submit(acme, "passport", "GB", "CD654321", actor="key:1")
    assert second.status == "pending"
    with pytest.raises(VerificationError, match="reason"):
        await workflow.reject("acme", "  ", actor="cli:op")
    with pytest.raises(VerificationError, match="no organization"):
        await workflow.verify("ghost", actor="cli:op")


async def test_a_new_document_supersedes_a_pending_one(db: Database) -> None:
    (acme,) = await org_ids(db, "acme")
    workflow = Verifications(db)
    await workflow.submit(acme, "passport", "FR", "AAAA1111", actor="key:1")
    await workflow.submit(acme, "passport", "FR", "BBBB2222", actor="key:1")
    async with db.engine.connect() as conn:
        stored = (await conn.execute(select(verification_requests.c.status))).scalars().all()
    assert sorted(stored) == ["pending", "superseded"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (("selfie", "FR", NUMBER), "document_type"),
        (("passport", "France", NUMBER), "country"),
        (("passport", "FR", "12"), "number"),
        (("passport", "FR", "ab#cd$ef"), "number"),
    ],
)
def test_bad_documents_name_the_field(fields: tuple[str, str, str], param: str) -> None:
    with pytest.raises(VerificationError) as caught:
        normalize_document(*fields)
    assert caught.value.param == param


def test_the_document_hash_is_keyed_and_deterministic() -> None:
    fields = normalize_document("passport", "fr", "x7 y6-z5w4")
    assert fields == ("passport", "FR", NUMBER)
    key = bytes(32)
    digest = document_hash(key, *fields)
    assert digest == document_hash(key, *normalize_document("passport", "FR", NUMBER))
    assert digest != document_hash(b"\x01" * 32, *fields)
    assert NUMBER.lower() not in digest and len(digest) == 64
    assert REUSE_WINDOW == 90 * DAY


def test_gates() -> None:
    assert needs_verification("all", stream=False) and needs_verification("all", stream=True)
    assert needs_verification("streaming", stream=True)
    assert not needs_verification("streaming", stream=False)
    assert not needs_verification("none", stream=True)
