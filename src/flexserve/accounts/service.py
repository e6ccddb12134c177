"""Organizations, their projects and API keys, and who a key belongs to.

An organization is created with one project, "Default project"; a key belongs
to one project and acts for its organization. Only a key's SHA-256 hash is
stored, so ``authenticate`` is one indexed lookup by hash.
"""

from __future__ import annotations

import re
import secrets
import string
import time
from dataclasses import dataclass

from sqlalchemy import RowMapping, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from flexserve.accounts.keys import display_prefix, generate_key, hash_key, hashes_match
from flexserve.store.database import Database
from flexserve.store.schema import api_keys, organizations, projects
from flexserve.tiers import ServiceTier

DEFAULT_PROJECT_NAME = "Default project"
VERIFICATION_STATUSES = ("unverified", "pending", "verified", "rejected")

# Letters, digits, space, '-' and '_', 1 to 64 of them; no space at either end,
# so that "acme" and "acme " cannot be two organizations.
_ORG_NAME = re.compile(r"(?! )[A-Za-z0-9 _-]{1,64}(?<! )")
# A project's default is what `auto` means; batch is reached only via /v1/batches.
_PROJECT_TIERS = tuple(t.value for t in ServiceTier if t is not ServiceTier.BATCH)
_ID_ALPHABET = string.ascii_letters + string.digits
_ORG_COLUMNS = (
    organizations.c.id,
    organizations.c.name,
    organizations.c.verification_status,
    organizations.c.created_at,
)


class AccountError(Exception):
    """An account operation that cannot be done; the message says why."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from: resolved from its API key."""

    key_id: str
    org_id: str
    org_name: str
    project_id: str
    is_admin: bool
    default_service_tier: str  # the project's tier for `auto`
    verification_status: str


@dataclass(frozen=True, slots=True)
class Organization:
    id: str
    name: str
    verification_status: str
    created_at: int  # unix seconds


class Accounts:
    """Reads and writes organizations, projects and keys in the database."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Built once: authenticate() runs for every uncached key.
        self._principal_by_hash = (
            select(
                api_keys.c.id,
                api_keys.c.key_hash,
                api_keys.c.org_id,
                organizations.c.name,
                api_keys.c.project_id,
                api_keys.c.is_admin,
                projects.c.default_service_tier,
                organizations.c.verification_status,
            )
            .select_from(
                api_keys.join(organizations, organizations.c.id == api_keys.c.org_id).join(
                    projects, projects.c.id == api_keys.c.project_id
                )
            )
            .where(api_keys.c.key_hash == bindparam("key_hash"))
            .where(api_keys.c.revoked_at.is_(None))
        )

    async def create_org(self, name: str, default_service_tier: str = "default") -> Organization:
        """Create an organization and its default project."""
        if not _ORG_NAME.fullmatch(name):
            raise AccountError(
                f"invalid organization name {name!r}: use 1-64 letters, digits, spaces, "
                "'-' or '_', not starting or ending with a space"
            )
        if default_service_tier not in _PROJECT_TIERS:
            raise AccountError(
                f"invalid default service tier {default_service_tier!r}: "
                f"use one of {', '.join(_PROJECT_TIERS)}"
            )
        org = Organization(
            id=new_id("org-"), name=name, verification_status="unverified", created_at=_now()
        )
        try:
            async with self._db.engine.begin() as conn:
                await conn.execute(
                    insert(organizations).values(
                        id=org.id,
                        name=org.name,
                        verification_status=org.verification_status,
                        created_at=org.created_at,
                    )
                )
                await conn.execute(
                    insert(projects).values(
                        id=new_id("proj_"),
                        org_id=org.id,
                        name=DEFAULT_PROJECT_NAME,
                        default_service_tier=default_service_tier,
                        created_at=org.created_at,
                    )
                )
        except IntegrityError as exc:
            raise AccountError(f"organization {name!r} already exists") from exc
        return org

    async def list_orgs(self) -> list[Organization]:
        query = select(*_ORG_COLUMNS).order_by(organizations.c.created_at, organizations.c.name)
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_organization(row._mapping) for row in rows]

    async def get_org(self, name: str) -> Organization:
        query = select(*_ORG_COLUMNS).where(organizations.c.name == name)
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise AccountError(f"no organization named {name!r}")
        return _organization(row._mapping)

    async def set_verification(self, name: str, status: str) -> Organization:
        """Set an organization's verification status directly, without a
        document or an audit entry (``accounts.verification`` is the audited
        workflow)."""
        if status not in VERIFICATION_STATUSES:
            raise AccountError(
                f"invalid verification status {status!r}: use one of "
                f"{', '.join(VERIFICATION_STATUSES)}"
            )
        # Write first, then read: on SQLite a transaction that reads before it
        # writes can fail at once when another connection wrote in between.
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                update(organizations)
                .where(organizations.c.name == name)
                .values(verification_status=status)
            )
            if result.rowcount == 0:
                raise AccountError(f"no organization named {name!r}")
            row = (
                await conn.execute(select(*_ORG_COLUMNS).where(organizations.c.name == name))
            ).one()
        return _organization(row._mapping)

    async def count_orgs(self) -> int:
        async with self._db.engine.connect() as conn:
            count = (
                await conn.execute(select(func.count()).select_from(organizations))
            ).scalar_one()
        return int(count)

    async def create_key(
        self, org_name: str, *, admin: bool = False, project_id: str | None = None
    ) -> tuple[str, str]:
        """Create a key for a project of ``org_name`` (its default project if none).

        Returns ``(key_id, key)``. The key is returned once and never stored.
        """
        query = (
            select(organizations.c.id, projects.c.id)
            .select_from(organizations.join(projects, projects.c.org_id == organizations.c.id))
            .where(organizations.c.name == org_name)
        )
        if project_id is None:
            query = query.where(projects.c.name == DEFAULT_PROJECT_NAME)
        else:
            query = query.where(projects.c.id == project_id)
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            await self.get_org(org_name)  # raises if the organization is unknown
            raise AccountError(f"organization {org_name!r} has no project {project_id!r}")
        org_id, key_project_id = row

        key_id = new_id("key_")
        key = generate_key()
        # A separate, write-only transaction (see set_verification); the
        # foreign keys still refuse a project deleted in between.
        async with self._db.engine.begin() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=key_id,
                    org_id=org_id,
                    project_id=key_project_id,
                    key_hash=hash_key(key),
                    prefix=display_prefix(key),
                    is_admin=admin,
                    created_at=_now(),
                    revoked_at=None,
                )
            )
        return key_id, key

    async def revoke_key(self, key_id: str) -> None:
        """Revoke a key; revoking it again changes nothing."""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
            if result.rowcount == 0:
                exists = (
                    await conn.execute(select(api_keys.c.id).where(api_keys.c.id == key_id))
                ).first()
                if exists is None:
                    raise AccountError(f"no API key with id {key_id!r}")

    async def authenticate(self, api_key: str) -> Principal | None:
        """The principal an API key acts for; None for an unknown or revoked key."""
        if not api_key:
            return None
        digest = hash_key(api_key)
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(self._principal_by_hash, {"key_hash": digest})).first()
        # The database found the row by an index walk, which is not constant
        # time; this compare is, so nothing about the stored hash leaks here.
        if row is None or not hashes_match(row.key_hash, digest):
            return None
        return Principal(
            key_id=row.id,
            org_id=row.org_id,
            org_name=row.name,
            project_id=row.project_id,
            is_admin=bool(row.is_admin),
            default_service_tier=row.default_service_tier,
            verification_status=row.verification_status,
        )


def _organization(row: RowMapping) -> Organization:
    return Organization(
        id=row["id"],
        name=row["name"],
        verification_status=row["verification_status"],
        created_at=int(row["created_at"]),
    )


def new_id(prefix: str) -> str:
    """``org-…``, ``proj_…``, ``key_…``: 24 random letters and digits after the prefix."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _now() -> int:
    return int(time.time())
