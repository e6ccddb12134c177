"""Usage, cost and savings reports, aggregated in SQL from the ledger.

Each report reads one organization's billable usage records over a time
range, in buckets of ``width`` seconds that start at ``origin``
(``origin + k·width``), grouped by the columns asked for. The database does
the summing (portable SQLAlchemy Core: SQLite and PostgreSQL alike); Python
only turns the rows into the API's shapes (``api.admin``).

Only billable records count (``billing.cost.BILLABLE_STATUSES``): usage is
what the organization was charged for, so usage and costs always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Select, case, func, literal, select

from flexserve.billing.cost import BILLABLE_STATUSES
from flexserve.store.database import Database
from flexserve.store.schema import usage_records as ur
from flexserve.tiers import ServiceTier

_USAGE_GROUPS: dict[str, ColumnElement[Any]] = {
    "project_id": ur.c.project_id,
    "api_key_id": ur.c.api_key_id,
    "model": ur.c.model,
    "service_tier": ur.c.served_tier,
    "batch": case((ur.c.served_tier == ServiceTier.BATCH.value, True), else_=False),
}
_COST_GROUPS: dict[str, ColumnElement[Any]] = {
    "project_id": ur.c.project_id,
    "api_key_id": ur.c.api_key_id,
}
USAGE_GROUP_BY = (*_USAGE_GROUPS, "user_id")  # user_id: accepted, always null (no users here)
COST_GROUP_BY = (*_COST_GROUPS, "line_item")
SAVING_TIERS = (ServiceTier.FLEX.value, ServiceTier.BATCH.value)


@dataclass(frozen=True, slots=True)
class ReportQuery:
    """What a report covers."""

    org_id: str | None  # None: every organization (the operator's reports)
    origin: int  # unix seconds where bucket 0 starts
    width: int  # bucket width, seconds
    start: int  # first second counted (inclusive)
    end: int  # end of the range (exclusive)
    group_by: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    project_ids: tuple[str, ...] = ()
    api_key_ids: tuple[str, ...] = ()
    batch: bool | None = None  # True: batch only; False: everything else


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One group in one bucket."""

    bucket_start: int
    keys: dict[str, Any]  # the group_by values
    sums: dict[str, int] = field(default_factory=dict)


def _bucket(query: ReportQuery) -> ColumnElement[Any]:
    # Integer floor division on both databases (created_at >= origin here).
    return (ur.c.created_at - literal(query.origin)) // literal(query.width)


def _filtered(statement: Select[Any], query: ReportQuery) -> Select[Any]:
    if query.org_id is not None:
        statement = statement.where(ur.c.org_id == query.org_id)
    statement = (
        statement.where(ur.c.created_at >= query.start)
        .where(ur.c.created_at < query.end)
        .where(ur.c.status.in_(BILLABLE_STATUSES))
    )
    if query.models:
        statement = statement.where(ur.c.model.in_(query.models))
    if query.project_ids:
        statement = statement.where(ur.c.project_id.in_(query.project_ids))
    if query.api_key_ids:
        statement = statement.where(ur.c.api_key_id.in_(query.api_key_ids))
    if query.batch is not None:
        is_batch = ur.c.served_tier == ServiceTier.BATCH.value
        statement = statement.where(is_batch if query.batch else ~is_batch)
    return statement


async def _grouped(
    db: Database,
    query: ReportQuery,
    groups: dict[str, ColumnElement[Any]],
    sums: dict[str, ColumnElement[Any]],
    extra_where: Sequence[ColumnElement[bool]] = (),
) -> list[ReportRow]:
    bucket = _bucket(query).label("bucket")
    keys = [column.label(name) for name, column in groups.items()]
    totals = [func.coalesce(func.sum(column), 0).label(name) for name, column in sums.items()]
    statement = _filtered(select(bucket, *keys, *totals), query)
    for condition in extra_where:
        statement = statement.where(condition)
    statement = statement.group_by(bucket, *keys).order_by(bucket, *keys)
    async with db.engine.connect() as conn:
        rows = (await conn.execute(statement)).all()
    return [
        ReportRow(
            bucket_start=query.origin + int(row.bucket) * query.width,
            keys={name: getattr(row, name) for name in groups},
            sums={name: int(getattr(row, name)) for name in sums},
        )
        for row in rows
    ]


async def usage_report(db: Database, query: ReportQuery) -> list[ReportRow]:
    """Tokens and requests per bucket and group."""
    groups = {name: _USAGE_GROUPS[name] for name in query.group_by if name in _USAGE_GROUPS}
    rows = await _grouped(
        db,
        query,
        groups,
        {
            "input_tokens": ur.c.prompt_tokens,
            "input_cached_tokens": ur.c.cached_tokens,
            "output_tokens": ur.c.completion_tokens,
            "num_model_requests": literal(1),
        },
    )
    if "batch" in groups:
        for row in rows:
            # SQLite hands a CASE's boolean back as 0 or 1.
            row.keys["batch"] = bool(row.keys["batch"])
    return rows


async def cost_report(db: Database, query: ReportQuery) -> list[ReportRow]:
    """Charged cost per bucket and group, per line item (input, cached input,
    output) and per model and served tier, with the tokens each line covers."""
    groups = {name: _COST_GROUPS[name] for name in query.group_by if name in _COST_GROUPS}
    # Line items are "<model>, <line>, <tier>": always split by model and tier
    # underneath, and merged back in Python when line_item was not asked for.
    groups |= {"model": ur.c.model, "service_tier": ur.c.served_tier}
    return await _grouped(
        db,
        query,
        groups,
        {
            "input_cost": ur.c.input_cost_pico,
            "cached_input_cost": ur.c.cached_input_cost_pico,
            "output_cost": ur.c.output_cost_pico,
            "input_tokens": ur.c.prompt_tokens - ur.c.cached_tokens,
            "cached_input_tokens": ur.c.cached_tokens,
            "output_tokens": ur.c.completion_tokens,
        },
    )


async def savings_report(db: Database, query: ReportQuery) -> list[ReportRow]:
    """What flex and batch cost against the same tokens at list price."""
    return await _grouped(
        db,
        query,
        {"service_tier": ur.c.served_tier},
        {
            "list_cost": ur.c.list_cost_pico,
            "cost": ur.c.input_cost_pico + ur.c.cached_input_cost_pico + ur.c.output_cost_pico,
            "num_model_requests": literal(1),
        },
        extra_where=[ur.c.served_tier.in_(SAVING_TIERS)],
    )


async def org_totals_report(db: Database, query: ReportQuery) -> list[ReportRow]:
    """Per organization and served tier (every organization unless the query
    names one): what was charged, what it would have cost at list price,
    requests and tokens; bucketed as the other reports."""
    return await _grouped(
        db,
        query,
        {"org_id": ur.c.org_id, "service_tier": ur.c.served_tier},
        {
            "cost": ur.c.input_cost_pico + ur.c.cached_input_cost_pico + ur.c.output_cost_pico,
            "list_cost": ur.c.list_cost_pico,
            "num_model_requests": literal(1),
            "tokens": ur.c.prompt_tokens + ur.c.completion_tokens,
        },
    )
