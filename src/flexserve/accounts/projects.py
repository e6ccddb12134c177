"""Projects: create and list them, and set what `auto` means for each.

A project's ``default_service_tier`` is the tier a request with
``service_tier: auto`` (or none) is queued on: ``default`` unless set. The
gateway reads it with the API key (``Principal.default_service_tier``), so a
change is seen within the key cache's lifetime (``api.auth.KeyCache``, 5 s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from flexserve.accounts.service import AccountError, new_id
from flexserve.store.audit import append_audit, update_one
from flexserve.store.database import Database
from flexserve.store.schema import organizations, projects
from flexserve.tiers import ServiceTier

# Batch is reached only through /v1/batches, so `auto` never means it.
PROJECT_TIERS = tuple(t.value for t in ServiceTier if t is not ServiceTier.BATCH)


@dataclass(frozen=True, slots=True)
class Project:
    id: str
    org_id: str
    name: str
    default_service_tier: str
    monthly_budget_micro: int | None  # micro-dollars; None: no budget of its own
    created_at: int


class Projects:
    """Reads and writes projects."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self, org_name: str, name: str, *, default_service_tier: str = "default"
    ) -> Project:
        _check_tier(default_service_tier)
        if not 1 <= len(name) <= 64 or name != name.strip():
            raise AccountError(f"invalid project name {name!r}: 1-64 characters, no outer spaces")
        project_id = new_id("proj_")
        now = int(time.time())
        async with self._db.engine.connect() as conn:
            org_id = (
                await conn.execute(
                    select(organizations.c.id).where(organizations.c.name == org_name)
                )
            ).scalar()
        if org_id is None:
            raise AccountError(f"no organization named {org_name!r}")
        # A separate, write-only transaction (see Accounts.create_key).
        try:
            async with self._db.engine.begin() as conn:
                await conn.execute(
                    insert(projects).values(
                        id=project_id,
                        org_id=org_id,
                        name=name,
                        default_service_tier=default_service_tier,
                        created_at=now,
                    )
                )
        except IntegrityError as exc:
            raise AccountError(f"organization {org_name!r} already has a project {name!r}") from exc
        return Project(project_id, str(org_id), name, default_service_tier, None, now)

    async def list(self, org_name: str) -> list[Project]:
        query = (
            select(projects)
            .select_from(projects.join(organizations, organizations.c.id == projects.c.org_id))
            .where(organizations.c.name == org_name)
            .order_by(projects.c.created_at, projects.c.name)
        )
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                exists = (
                    await conn.execute(
                        select(organizations.c.id).where(organizations.c.name == org_name)
                    )
                ).first()
                if exists is None:
                    raise AccountError(f"no organization named {org_name!r}")
        return [
            Project(
                row.id,
                row.org_id,
                row.name,
                row.default_service_tier,
                row.monthly_budget_micro,
                int(row.created_at),
            )
            for row in rows
        ]

    async def set_tier(self, project_id: str, tier: str, *, actor: str) -> None:
        """Set the tier `auto` means for the project."""
        _check_tier(tier)
        async with self._db.engine.begin() as conn:
            org_id = await update_one(
                conn, projects, projects.c.id == project_id,
                {"default_service_tier": tier}, projects.c.org_id,
            )
            if org_id is None:
                raise AccountError(f"no project with id {project_id!r}")
            await append_audit(
                conn,
                actor=actor,
                action="project.tier_set",
                org_id=org_id,
                detail={"project_id": project_id, "default_service_tier": tier},
            )


def _check_tier(tier: str) -> None:
    if tier not in PROJECT_TIERS:
        raise AccountError(f"invalid tier {tier!r}: use one of {', '.join(PROJECT_TIERS)}")
