"""The audit log: who decided what, when, appended in the same transaction as
the change it records (so a change is never stored without its entry)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from flexserve.store.schema import audit_log

SYSTEM_ACTOR = "system"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    created_at: int  # unix seconds
    actor: str  # "cli:alice", "key:key_…", "system"
    action: str  # "verification.verified", "budget.set", …
    org_id: str | None
    detail: dict[str, Any]


async def append_audit(
    conn: AsyncConnection,
    *,
    actor: str,
    action: str,
    org_id: str | None,
    detail: dict[str, Any],
    at: int | None = None,
) -> None:
    """Add one entry, inside the caller's transaction."""
    await conn.execute(
        insert(audit_log).values(
            created_at=int(time.time()) if at is None else at,
            actor=actor,
            action=action,
            org_id=org_id,
            detail=json.dumps(detail, sort_keys=True),
        )
    )


async def read_audit(
    conn: AsyncConnection, *, org_id: str | None = None, limit: int = 100
) -> list[AuditEntry]:
    """The newest entries first (one organization's, when ``org_id`` is given)."""
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if org_id is not None:
        query = query.where(audit_log.c.org_id == org_id)
    rows = (await conn.execute(query)).all()
    return [
        AuditEntry(
            id=row.id,
            created_at=row.created_at,
            actor=row.actor,
            action=row.action,
            org_id=row.org_id,
            detail=json.loads(row.detail),
        )
        for row in rows
    ]


async def update_one(
    conn: AsyncConnection,
    table: Table,
    where: ColumnElement[bool],
    values: dict[str, Any],
    read: ColumnElement[Any],
) -> Any | None:
    """Update the row matching ``where`` and return its ``read`` column, or None
    when no row matched. Writes first, then reads: on SQLite a transaction that
    reads before it writes can fail at once when another connection wrote in
    between."""
    result = await conn.execute(update(table).where(where).values(**values))
    if result.rowcount == 0:
        return None
    return (await conn.execute(select(read).where(where))).scalar_one()

