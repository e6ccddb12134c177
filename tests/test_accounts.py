"""Organizations, projects and keys, against a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from flexserve.accounts import AccountError, Accounts, Principal
from flexserve.accounts.keys import display_prefix, hash_key
from flexserve.store import Database
from flexserve.store.schema import api_keys, projects


@pytest.fixture
async def db(tmp_db_url: str) -> AsyncIterator[Database]:
    database = Database.from_url(tmp_db_url)
    await database.migrate()
    yield database
    await database.close()


async def test_create_org_makes_its_default_project(db: Database) -> None:
    accounts = Accounts(db)
    org = await accounts.create_org("acme", default_service_tier="flex")
    assert org.id.startswith("org-") and org.name == "acme"
    assert org.verification_status == "unverified"
    async with db.engine.connect() as conn:
        rows = (await conn.execute(select(projects).where(projects.c.org_id == org.id))).all()
    assert [(r.name, r.default_service_tier) for r in rows] == [("Default project", "flex")]
    assert rows[0].id.startswith("proj_")
    assert await accounts.get_org("acme") == org
    assert await accounts.count_orgs() == 1


async def test_duplicate_org_name_is_refused(db: Database) -> None:
    accounts = Accounts(db)
    await accounts.create_org("acme")
    with pytest.raises(AccountError, match="already exists"):
        await accounts.create_org("acme")
    assert [org.name for org in await accounts.list_orgs()] == ["acme"]


@pytest.mark.parametrize("name", ["", " acme", "acme ", "a" * 65, "acme/corp", "ac\nme", "é"])
async def test_bad_org_names_are_refused(db: Database, name: str) -> None:
    with pytest.raises(AccountError, match="invalid organization name"):
        await Accounts(db).create_org(name)


async def test_bad_default_tier_is_refused(db: Database) -> None:
    with pytest.raises(AccountError, match="tier"):
        await Accounts(db).create_org("acme", default_service_tier="batch")


async def test_a_key_authenticates_as_its_org_and_project(db: Database) -> None:
    accounts = Accounts(db)
    org = await accounts.create_org("acme Labs_2", default_service_tier="priority")
    key_id, key = await accounts.create_key("acme Labs_2", admin=True)
    assert key.startswith("sk-fs-") and len(key) == len("sk-fs-") + 43
    principal = await accounts.authenticate(key)
    async with db.engine.connect() as conn:
        project_id = (
            await conn.execute(select(projects.c.id).where(projects.c.org_id == org.id))
        ).scalar_one()
    assert principal == Principal(
        key_id=key_id,
        org_id=org.id,
        org_name="acme Labs_2",
        project_id=project_id,
        is_admin=True,
        default_service_tier="priority",
        verification_status="unverified",
    )
    _, plain_key = await accounts.create_key("acme Labs_2")
    plain = await accounts.authenticate(plain_key)
    assert plain is not None and plain.is_admin is False


async def test_keys_are_unique(db: Database) -> None:
    accounts = Accounts(db)
    await accounts.create_org("acme")
    made = [await accounts.create_key("acme") for _ in range(20)]
    assert len({key for _, key in made}) == 20
    assert len({key_id for key_id, _ in made}) == 20


async def test_wrong_and_revoked_keys_do_not_authenticate(db: Database) -> None:
    accounts = Accounts(db)
    await accounts.create_org("acme")
    key_id, key = await accounts.create_key("acme")
    _, other = await accounts.create_key("acme")
    assert await accounts.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert await accounts.authenticate("") is None
    assert await accounts.authenticate("sk-fs-nothing") is None

    await accounts.revoke_key(key_id)
    assert await accounts.authenticate(key) is None
    await accounts.revoke_key(key_id)  # again: nothing changes
    assert await accounts.authenticate(key) is None
    assert await accounts.authenticate(other) is not None  # only that key
    with pytest.raises(AccountError, match="no API key"):
        await accounts.revoke_key("key_unknown")


async def test_create_key_for_unknown_org_or_project(db: Database) -> None:
    accounts = Accounts(db)
    with pytest.raises(AccountError, match="no organization named 'ghost'"):
        await accounts.create_key("ghost")
    await accounts.create_org("acme")
    with pytest.raises(AccountError, match="no project"):
        await accounts.create_key("acme", project_id="proj_other")


async def test_key_for_a_named_project_of_the_org(db: Database) -> None:
    accounts = Accounts(db)
    await accounts.create_org("acme")
    other = await accounts.create_org("other")
    async with db.engine.connect() as conn:
        other_project = (
            await conn.execute(select(projects.c.id).where(projects.c.org_id == other.id))
        ).scalar_one()
    # Another organization's project is not one of acme's.
    with pytest.raises(AccountError, match="no project"):
        await accounts.create_key("acme", project_id=other_project)
    _, key = await accounts.create_key("other", project_id=other_project)
    principal = await accounts.authenticate(key)
    assert principal is not None and principal.project_id == other_project


@pytest.mark.sqlite_only
async def test_the_plaintext_key_is_never_stored(db: Database, tmp_path: Path) -> None:
    accounts = Accounts(db)
    await accounts.create_org("acme")
    key_id, key = await accounts.create_key("acme")
    async with db.engine.connect() as conn:
        row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).one()
    assert row.key_hash == hash_key(key)
    assert row.prefix == display_prefix(key) == f"{key[:8]}…{key[-4:]}"
    await db.close()  # checkpoints the WAL into the main file

    stored = b"".join(path.read_bytes() for path in tmp_path.glob("flexserve.db*"))
    assert hash_key(key).encode() in stored  # the bytes read are the database's
    assert key.encode() not in stored
    assert key[8:-4].encode() not in stored


async def test_verification(db: Database) -> None:
    accounts = Accounts(db)
    await accounts.create_org("acme")
    _, key = await accounts.create_key("acme")
    verified = await accounts.set_verification("acme", "verified")
    assert verified.verification_status == "verified"
    assert (await accounts.get_org("acme")).verification_status == "verified"
    principal = await accounts.authenticate(key)
    assert principal is not None and principal.verification_status == "verified"
    assert (await accounts.set_verification("acme", "unverified")).verification_status == (
        "unverified"
    )
    with pytest.raises(AccountError, match="no organization"):
        await accounts.set_verification("ghost", "verified")
    with pytest.raises(AccountError, match="invalid verification status"):
        await accounts.set_verification("acme", "sort of")


async def test_list_orgs_oldest_first(db: Database) -> None:
    accounts = Accounts(db)
    for name in ("b", "a", "c"):
        await accounts.create_org(name)
    listed = await accounts.list_orgs()
    assert sorted(org.name for org in listed) == ["a", "b", "c"]
    assert [org.created_at for org in listed] == sorted(org.created_at for org in listed)
    with pytest.raises(AccountError, match="no organization named 'z'"):
        await accounts.get_org("z")
