"""The app-wide objects the handlers need, built once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from flexserve.accounts import Accounts
from flexserve.api.auth import KeyCache
from flexserve.api.metrics import GatewayMetrics
from flexserve.billing.usage import UsageWriter
from flexserve.config import Settings
from flexserve.scheduler.scheduler import Scheduler


@dataclass(eq=False)
class Services:
    settings: Settings
    accounts: Accounts
    keys: KeyCache
    scheduler: Scheduler
    usage: UsageWriter
    metrics: GatewayMetrics
