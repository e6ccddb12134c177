"""What the operator's page shows: every organization's spend from the
ledger, the verification queue and batches in flight from the database, and
this gateway's last hour (engines by tier, its queue, flex waits, refusals,
preemptions, default's latency) from ``observability.history``."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sqlalchemy import select

from flexserve.api.state import Services
from flexserve.billing.reports import SAVING_TIERS, ReportQuery, org_totals_report
from flexserve.dashboard.org import DAY, DAYS, recent_batches
from flexserve.dashboard.pages import BatchRow
from flexserve.observability.history import Sample
from flexserve.stats import percentile
from flexserve.store.schema import organizations, verification_requests
from flexserve.tiers import ServiceTier

MINUTE = 60


@dataclass(frozen=True, slots=True)
class OrgRow:
    org_id: str
    name: str
    verification: str
    requests: int
    tokens: int
    charged: int  # pico-dollars
    saved: int  # flex and batch against list price, pico-dollars


@dataclass(frozen=True, slots=True)
class PendingVerification:
    org_name: str
    document_type: str
    country: str
    submitted_at: int


@dataclass(frozen=True, slots=True)
class Latency:
    """Default-tier TTFT or TPOT over the last hour, against its SLO."""

    name: str
    num: int
    p50: float | None
    p99: float | None
    slo: float | None  # seconds; None: none configured


@dataclass
class OperatorView:
    operator: str
    days: int = DAYS
    samples: list[Sample] = field(default_factory=list)
    spare: list[dict[str, object]] = field(default_factory=list)  # Scheduler.flex_status()
    flex_waits: list[float] = field(default_factory=list)  # seconds queued, flex served in the hour
    # (minute's unix start, 429s, preemptions), the last hour, every minute.
    minutes: list[tuple[int, int, int]] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    # (day's unix start, {served tier: pico-dollars charged}, pico-dollars saved)
    daily: list[tuple[int, dict[str, int], int]] = field(default_factory=list)
    orgs: list[OrgRow] = field(default_factory=list)
    pending: list[PendingVerification] = field(default_factory=list)
    batches: list[BatchRow] = field(default_factory=list)
    # The last `flexserve plan` written to <home>/plan (plan/report.py), if any.
    plan: dict[str, Any] | None = None

    @property
    def org_names(self) -> dict[str, str]:
        return {org.org_id: org.name for org in self.orgs}

    @property
    def revenue(self) -> int:
        return sum(sum(tiers.values()) for _, tiers, _ in self.daily)

    @property
    def saved(self) -> int:
        return sum(saved for _, _, saved in self.daily)


async def operator_view(services: Services, operator: str, now: float | None = None) -> OperatorView:
    now = time.time() if now is None else now
    view = OperatorView(operator)
    await _ledger(services, view, now)
    view.pending = await pending_verifications(services)
    view.batches = await recent_batches(services, None, limit=50, in_flight=True)
    history = services.history
    view.spare = services.scheduler.flex_status()
    view.plan = latest_plan(Path(services.settings.home) / "plan" / "plan.json")
    if history is not None:
        view.samples = list(history.samples)
        finished = history.finished()
        view.flex_waits = [f.queue_time for f in finished if f.tier == ServiceTier.FLEX.value]
        defaults = [f for f in finished if f.tier == ServiceTier.DEFAULT.value]
        ttfts = [f.ttft for f in defaults if f.ttft is not None]
        tpots = [f.tpot for f in defaults if f.tpot is not None]
        tpot_slo = services.settings.tpot_slo or None
        view.latency = [Latency("TTFT", len(ttfts), percentile(ttfts, 50), percentile(ttfts, 99), None),
                        Latency("TPOT", len(tpots), percentile(tpots, 50), percentile(tpots, 99), tpot_slo)]
        view.minutes = per_minute(view.samples, [r.at for r in history.refused() if r.status == 429], now)
    return view


async def _ledger(services: Services, view: OperatorView, now: float) -> None:
    """Revenue and savings per day, and each organization's totals, over the last ``DAYS`` UTC days."""
    today = int(now) // DAY * DAY
    origin = today - (DAYS - 1) * DAY
    query = ReportQuery(None, origin=origin, width=DAY, start=origin, end=today + DAY)
    days: dict[int, tuple[dict[str, int], list[int]]] = {
        day: ({}, [0]) for day in range(origin, today + DAY, DAY)}
    per_org: dict[str, list[int]] = {}
    for row in await org_totals_report(services.db, query):
        tier = str(row.keys["service_tier"])
        sums = row.sums
        saved = sums["list_cost"] - sums["cost"] if tier in SAVING_TIERS else 0
        tiers, day_saved = days[row.bucket_start]
        tiers[tier] = tiers.get(tier, 0) + sums["cost"]
        day_saved[0] += saved
        totals = per_org.setdefault(str(row.keys["org_id"]), [0, 0, 0, 0])
        for i, value in enumerate((sums["num_model_requests"], sums["tokens"], sums["cost"], saved)):
            totals[i] += value
    view.daily = [(day, tiers, saved[0]) for day, (tiers, saved) in sorted(days.items())]
    o = organizations.c
    async with services.db.engine.connect() as conn:
        orgs = (await conn.execute(select(o.id, o.name, o.verification_status).order_by(o.name))).all()
    view.orgs = sorted(
        (OrgRow(org.id, org.name, org.verification_status, *per_org.get(org.id, (0, 0, 0, 0)))
         for org in orgs),
        key=lambda row: (-row.charged, row.name),
    )


async def pending_verifications(services: Services) -> list[PendingVerification]:
    """Documents waiting for a decision, oldest first."""
    v, o = verification_requests.c, organizations.c
    statement = (select(o.name, v.document_type, v.country, v.submitted_at)
                 .select_from(verification_requests.join(organizations, o.id == v.org_id))
                 .where(v.status == "pending").order_by(v.submitted_at, v.id))
    async with services.db.engine.connect() as conn:
        rows = (await conn.execute(statement)).all()
    return [PendingVerification(r.name, r.document_type, r.country, r.submitted_at) for r in rows]


def latest_plan(path: Path) -> dict[str, Any] | None:
    """The planner's last report in the gateway's home, if it wrote one there."""
    try:
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(document, dict) or document.get("report") != "flexserve-plan":
        return None
    return document


def per_minute(samples: list[Sample], refused_at: list[float], now: float) -> list[tuple[int, int, int]]:
    """429s and preemptions per minute over the last hour: refusals as they
    were seen, preemptions from the rise of the sampled running count."""
    last = int(now) // MINUTE * MINUTE
    first = last - 59 * MINUTE
    refusals = Counter(int(at) // MINUTE * MINUTE for at in refused_at)
    preempted: Counter[int] = Counter()
    for before, after in zip(samples, samples[1:], strict=False):
        preempted[int(after.at) // MINUTE * MINUTE] += max(0, after.preemptions - before.preemptions)
    return [(m, refusals[m], preempted[m]) for m in range(first, last + MINUTE, MINUTE)]
