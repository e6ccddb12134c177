"""The app-wide objects the handlers need, built once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flexserve.accounts import Accounts
from flexserve.accounts.verification import Verifications
from flexserve.api.auth import KeyCache
from flexserve.api.drain import Drain
from flexserve.api.gates import Gate
from flexserve.api.metrics import GatewayMetrics
from flexserve.billing.ratelimit import CallRate
from flexserve.billing.usage import UsageWriter
from flexserve.config import Settings
from flexserve.dashboard.sessions import Sessions
from flexserve.files import Files
from flexserve.observability.history import LiveHistory
from flexserve.observability.tracing import Tracing
from flexserve.scheduler.scheduler import Scheduler
from flexserve.store.database import Database

if TYPE_CHECKING:
    from flexserve.batches import Batches


@dataclass(eq=False)
class Services:
    settings: Settings
    accounts: Accounts
    keys: KeyCache
    scheduler: Scheduler
    usage: UsageWriter
    metrics: GatewayMetrics
    # Billing and governance: admission gates and metering, the
    # verification workflow, and the database the admin reports read.
    gate: Gate
    verifications: Verifications
    db: Database
    # Identity-document submissions per organization per minute.
    verification_rate: CallRate
    # Uploaded files and batch output (`/v1/files`).
    files: Files
    # The requests in progress, ended cleanly when the server shuts down.
    drain: Drain = field(default_factory=Drain)
    # Traces (observability/tracing.py): off unless an OTLP endpoint is configured.
    tracing: Tracing = field(default_factory=Tracing)
    # The dashboard's open sessions (dashboard/sessions.py).
    sessions: Sessions = field(default_factory=lambda: Sessions(3600.0))
    # The last hour the operator's dashboard plots (observability/history.py).
    history: LiveHistory | None = None
    # The Batch API's service and runner (None until the lifespan starts it).
    batches: Batches | None = None
