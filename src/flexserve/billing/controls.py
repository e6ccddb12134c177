"""What operators set to bound spending — monthly budgets and rate limits —
kept in the database, and the month's spend read back from the ledger.

The gateway reads these into memory (``api.gates``) and refreshes them every
``policy_refresh_interval`` seconds, so a change made from the CLI (another
process) takes effect within that time. Every change is audited.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from flexserve.billing.budget import org_scope, project_scope
from flexserve.billing.cost import BILLABLE_STATUSES
from flexserve.billing.pricing import MICRO_PER_USD, PICO_PER_USD, format_micro_usd
from flexserve.billing.ratelimit import RateLimit
from flexserve.store.audit import append_audit, update_one
from flexserve.store.database import Database
from flexserve.store.schema import organizations, projects, rate_limits, usage_records
from flexserve.tiers import ServiceTier

_PICO_PER_MICRO = PICO_PER_USD // MICRO_PER_USD


class ControlError(Exception):
    """A budget or limit that cannot be set; the message says why."""


def cost_sum() -> ColumnElement[Any]:
    """SUM of a usage row's charged cost, pico-dollars (0 for no rows)."""
    return func.coalesce(
        func.sum(
            usage_records.c.input_cost_pico
            + usage_records.c.cached_input_cost_pico
            + usage_records.c.output_cost_pico
        ),
        0,
    )


class Controls:
    """Reads and writes budgets and rate limits."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def set_org_budget(self, org_name: str, budget_micro: int | None, *, actor: str) -> str:
        """Set (None: remove) an organization's monthly budget; returns its id."""
        async with self._db.engine.begin() as conn:
            org_id = await update_one(
                conn, organizations, organizations.c.name == org_name,
                {"monthly_budget_micro": budget_micro}, organizations.c.id,
            )
            if org_id is None:
                raise ControlError(f"no organization named {org_name!r}")
            await append_audit(
                conn,
                actor=actor,
                action="budget.set",
                org_id=org_id,
                detail={"scope": "organization", "monthly_usd": _usd(budget_micro)},
            )
        return str(org_id)

    async def set_project_budget(
        self, project_id: str, budget_micro: int | None, *, actor: str
    ) -> None:
        """Set (None: remove) a project's own monthly budget."""
        async with self._db.engine.begin() as conn:
            org_id = await update_one(
                conn, projects, projects.c.id == project_id,
                {"monthly_budget_micro": budget_micro}, projects.c.org_id,
            )
            if org_id is None:
                raise ControlError(f"no project with id {project_id!r}")
            await append_audit(
                conn,
                actor=actor,
                action="budget.set",
                org_id=org_id,
                detail={
                    "scope": "project",
                    "project_id": project_id,
                    "monthly_usd": _usd(budget_micro),
                },
            )

    async def set_rate_limit(
        self,
        org_name: str,
        tier: ServiceTier,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        *,
        actor: str,
    ) -> None:
        """Set an organization's limits on one tier (both None: no limit)."""
        for name, value in (
            ("requests per minute", requests_per_minute),
            ("tokens per minute", tokens_per_minute),
        ):
            if value is not None and value < 1:
                raise ControlError(f"{name} must be at least 1 (leave it out for no limit)")
        async with self._db.engine.connect() as conn:
            org_id = (
                await conn.execute(
                    select(organizations.c.id).where(organizations.c.name == org_name)
                )
            ).scalar()
        if org_id is None:
            raise ControlError(f"no organization named {org_name!r}")
        # Writes only from here (see Accounts.create_key); the foreign key
        # still refuses an organization deleted in between.
        async with self._db.engine.begin() as conn:
            key = (rate_limits.c.org_id == org_id) & (rate_limits.c.tier == tier.value)
            await conn.execute(rate_limits.delete().where(key))
            if requests_per_minute is not None or tokens_per_minute is not None:
                await conn.execute(
                    rate_limits.insert().values(
                        org_id=org_id,
                        tier=tier.value,
                        requests_per_minute=requests_per_minute,
                        tokens_per_minute=tokens_per_minute,
                        updated_at=int(time.time()),
                    )
                )
            await append_audit(
                conn,
                actor=actor,
                action="rate_limit.set",
                org_id=org_id,
                detail={
                    "tier": tier.value,
                    "requests_per_minute": requests_per_minute,
                    "tokens_per_minute": tokens_per_minute,
                },
            )

    async def load_budget_limits(self) -> dict[str, int]:
        """Every budget, by scope, in pico-dollars."""
        async with self._db.engine.connect() as conn:
            return await budget_limits(conn)

    async def load_rate_limits(self) -> dict[tuple[str, ServiceTier], RateLimit]:
        async with self._db.engine.connect() as conn:
            rows = await conn.execute(select(rate_limits))
            return {
                (row.org_id, ServiceTier(row.tier)): RateLimit(
                    row.requests_per_minute, row.tokens_per_minute
                )
                for row in rows
            }

    async def spend_since(self, since: int) -> dict[str, int]:
        """Charged cost since ``since`` (unix seconds), per organization and
        per project scope, pico-dollars: the budgets' starting point."""
        query = (
            select(usage_records.c.org_id, usage_records.c.project_id, cost_sum().label("cost"))
            .where(usage_records.c.created_at >= since)
            .where(usage_records.c.status.in_(BILLABLE_STATUSES))
            .group_by(usage_records.c.org_id, usage_records.c.project_id)
        )
        spent: dict[str, int] = {}
        async with self._db.engine.connect() as conn:
            for row in await conn.execute(query):
                for scope in (org_scope(row.org_id), project_scope(row.project_id)):
                    spent[scope] = spent.get(scope, 0) + int(row.cost)
        return spent


async def budget_limits(conn: AsyncConnection) -> dict[str, int]:
    limits: dict[str, int] = {}
    for table, scope in ((organizations, org_scope), (projects, project_scope)):
        rows = await conn.execute(
            select(table.c.id, table.c.monthly_budget_micro).where(
                table.c.monthly_budget_micro.is_not(None)
            )
        )
        for row in rows:
            limits[scope(row.id)] = int(row.monthly_budget_micro) * _PICO_PER_MICRO
    return limits


def _usd(micro: int | None) -> str | None:
    return None if micro is None else format_micro_usd(micro)
