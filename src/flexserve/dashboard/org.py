"""What an organization's page shows, read from the ledger (the usage and
costs APIs' own queries), the budgets and rate limits in force, and this
gateway's last hour of its flex requests (``observability.history``)."""

from __future__ import annotations

import time

from sqlalchemy import select

from flexserve.api.state import Services
from flexserve.billing.budget import month_start, org_scope
from flexserve.billing.reports import ReportQuery, cost_report, org_totals_report, savings_report
from flexserve.dashboard.pages import BatchRow, FlexHour, OrgView, RateRow
from flexserve.dashboard.sessions import Session
from flexserve.stats import percentile
from flexserve.store.schema import batches as batches_table
from flexserve.store.schema import rate_limits

DAY = 86400
DAYS = 30
# The window a rate limit counts (requests and tokens per minute).
MINUTE = 60


def line_cost(sums: dict[str, int]) -> int:
    return sums["input_cost"] + sums["cached_input_cost"] + sums["output_cost"]


async def org_view(services: Services, session: Session, now: float | None = None) -> OrgView:
    """The organization's last ``DAYS`` UTC days, from the ledger (the costs API's figures)."""
    now = time.time() if now is None else now
    today = int(now) // DAY * DAY
    origin = today - (DAYS - 1) * DAY
    query = ReportQuery(session.org_id, origin=origin, width=DAY, start=origin, end=today + DAY)
    per_day = dict.fromkeys(range(origin, today + DAY, DAY), 0)
    by_model_tier: dict[tuple[str, str], int] = {}
    for row in await cost_report(services.db, query):
        pico = line_cost(row.sums)
        per_day[row.bucket_start] += pico
        key = (str(row.keys["model"]), str(row.keys["service_tier"]))
        by_model_tier[key] = by_model_tier.get(key, 0) + pico
    savings: dict[str, tuple[int, int]] = {}
    for row in await savings_report(services.db, query):
        tier = str(row.keys["service_tier"])
        cost, listed = savings.get(tier, (0, 0))
        savings[tier] = (cost + row.sums["cost"], listed + row.sums["list_cost"])
    return OrgView(
        org_name=session.org_name, days=DAYS, daily=sorted(per_day.items()),
        by_model_tier=[(m, t, p) for (m, t), p in sorted(by_model_tier.items())],
        savings=[(tier, cost, listed) for tier, (cost, listed) in sorted(savings.items())],
        batches=await recent_batches(services, session.org_id),
        budget=services.gate.budgets.limit(org_scope(session.org_id)),
        month_spent=await month_spent(services, session.org_id, now),
        rates=await rate_headroom(services, session.org_id, now),
        flex=flex_hour(services, session.org_id),
    )


async def month_spent(services: Services, org_id: str, now: float) -> int:
    """What the organization was charged this calendar month (UTC) so far."""
    start = month_start(now)
    end = int(now) + 1
    query = ReportQuery(org_id, origin=start, width=end - start, start=start, end=end)
    return sum(line_cost(row.sums) for row in await cost_report(services.db, query))


async def rate_headroom(services: Services, org_id: str, now: float) -> list[RateRow]:
    """Each tier's rate limit and what the last minute's requests used of it
    (from the ledger: every gateway's)."""
    r = rate_limits.c
    statement = select(r.tier, r.requests_per_minute, r.tokens_per_minute).where(r.org_id == org_id)
    async with services.db.engine.connect() as conn:
        limits = (await conn.execute(statement.order_by(r.tier))).all()
    if not limits:
        return []
    start = int(now) - MINUTE
    query = ReportQuery(org_id, origin=start, width=MINUTE + 1, start=start, end=int(now) + 1)
    used: dict[str, tuple[int, int]] = {}
    for row in await org_totals_report(services.db, query):
        used[str(row.keys["service_tier"])] = (row.sums["num_model_requests"], row.sums["tokens"])
    return [RateRow(limit.tier, limit.requests_per_minute, limit.tokens_per_minute,
                    *used.get(limit.tier, (0, 0))) for limit in limits]


def flex_hour(services: Services, org_id: str) -> FlexHour:
    """This gateway's last hour of the organization's flex requests."""
    history = services.history
    if history is None:
        return FlexHour(0, 0, None, None)
    waits = [f.queue_time for f in history.finished() if f.org_id == org_id and f.tier == "flex"]
    refused = sum(1 for r in history.refused()
                  if r.org_id == org_id and r.tier == "flex" and r.status == 429)
    return FlexHour(len(waits), refused, percentile(waits, 50), percentile(waits, 90))


async def recent_batches(services: Services, org_id: str | None, limit: int = 20,
                         in_flight: bool = False) -> list[BatchRow]:
    """Latest batches, newest first, with their progress and cost so far: the
    organization's, or (``org_id`` None) everyone's; ``in_flight``: only
    those not yet ended."""
    b = batches_table
    statement = (select(b.c.id, b.c.org_id, b.c.status, b.c.total, b.c.completed, b.c.failed,
                        b.c.cost_pico)
                 .order_by(b.c.created_at.desc(), b.c.id).limit(limit))
    if org_id is not None:
        statement = statement.where(b.c.org_id == org_id)
    if in_flight:
        statement = statement.where(b.c.status.in_(("validating", "in_progress", "finalizing",
                                                    "cancelling")))
    async with services.db.engine.connect() as conn:
        rows = (await conn.execute(statement)).all()
    return [BatchRow(row.id, row.status, row.total, row.completed, row.failed, row.cost_pico, row.org_id)
            for row in rows]
