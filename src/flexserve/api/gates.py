"""The gates an inference request passes before it is queued, and the meter after.

``Gate.admit`` runs once the tier the request will be served on is known (a
priority request past priority's share is served, so limited and budgeted,
as default: ``Scheduler.tier_to_serve``): model verification gate, rate
limits of that tier (one request and its estimated tokens taken), budget
(the request's maximum cost at that tier's price reserved). It raises the client's error (403
``organization_verification_required``, 429 ``rate_limit_exceeded``, 429
``insufficient_quota``) or returns an ``Admission``. Every request admitted
ends in exactly one of:

- ``settle``: it reached an engine and finished, however it finished. Its
  cost is made at the *served* tier's price from the admission's price
  snapshot, written on the usage record with the price beside it, and the
  budget hold is swapped for the actual cost (nothing when the status is not
  billable, ``billing.cost.is_billable``);
- ``release``: it never produced a token (flex refused, no replica, client
  gone while queued). Nothing is charged.

Nothing here touches the database on the request path: prices, gates,
budgets and limits are in memory, reloaded every ``policy_refresh_interval``
seconds by a background task, so a change made with the CLI (another
process) is seen within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from flexserve.accounts import Principal
from flexserve.accounts.gates import ModelGates, needs_verification
from flexserve.api.inference import Inference
from flexserve.billing.budget import (
    BudgetExceeded,
    Budgets,
    LocalBudgets,
    Reservation,
    month_of,
    month_start,
    org_scope,
    project_scope,
)
from flexserve.billing.controls import Controls
from flexserve.billing.cost import NO_COST, TokenCounts, billed_costs, line_costs, max_cost
from flexserve.billing.price_book import PriceBook
from flexserve.billing.pricing import (
    MICRO_PER_USD,
    PICO_PER_USD,
    ModelPrice,
    PriceCatalog,
    format_micro_usd,
)
from flexserve.billing.ratelimit import RateLimiter, RateLimits, RateTake
from flexserve.billing.usage import UsageRecord
from flexserve.errors import InsufficientQuotaError, VerificationRequiredError
from flexserve.store.database import Database
from flexserve.tiers import ServiceTier

log = logging.getLogger(__name__)

# Output tokens assumed for the tokens-per-minute estimate when max_tokens is
# absent (corrected to the real count when the request ends).
_TPM_OUTPUT_GUESS = 256


@dataclass(frozen=True, slots=True)
class Policy:
    """What admission reads, swapped whole on each refresh."""

    prices: PriceCatalog = field(default_factory=PriceCatalog)
    model_gates: Mapping[str, str] = field(default_factory=dict)  # model → streaming/all


@dataclass(eq=False, slots=True)
class Admission:
    """One admitted request's holds, until it settles or is released."""

    prices: PriceCatalog  # the snapshot its cost is made from
    reservation: Reservation
    rate: RateTake
    # x-ratelimit-* headers for the response (empty when no limit applies).
    headers: dict[str, str]
    done: bool = False
    # A batch line's completion window: it is priced as the window's batch price.
    window: str | None = None


class Gate:
    """Admission and settlement, over in-memory policy refreshed in the background."""

    def __init__(
        self,
        db: Database,
        *,
        refresh_interval: float = 5.0,
        max_output_tokens: int = 65536,
        context_lengths: Mapping[str, int | None] | None = None,
        budgets: Budgets | None = None,
        limiter: RateLimits | None = None,
    ) -> None:
        self._db = db
        self._refresh_interval = refresh_interval
        self._max_output_tokens = max_output_tokens
        self._context_lengths = dict(context_lengths or {})
        self.budgets = budgets if budgets is not None else LocalBudgets()
        self.limiter = limiter if limiter is not None else RateLimiter()
        self.policy = Policy()
        self._closing = asyncio.Event()
        # Set to reload before the interval is up (a change announced).
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the policy and the month's spend so far, then keep them fresh."""
        await self.refresh()
        now = time.time()
        spent = await Controls(self._db).spend_since(month_start(now))
        self.budgets.load_spent(month_of(now), spent)
        await self.budgets.start()
        await self.limiter.start()
        self._task = asyncio.create_task(self._refresh_forever(), name="policy-refresh")

    def refresh_soon(self) -> None:
        """Reload the policy now rather than at the end of the interval."""
        self._wake.set()

    async def close(self) -> None:
        self._closing.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task])
        await self.budgets.close()
        await self.limiter.close()

    async def refresh(self) -> None:
        """Reload prices, gates, budgets and rate limits from the database."""
        controls = Controls(self._db)
        prices = await PriceBook(self._db).load()
        gates = await ModelGates(self._db).load()
        budget_limits = await controls.load_budget_limits()
        rate_limits = await controls.load_rate_limits()
        self.policy = Policy(prices, gates)
        self.budgets.set_limits(budget_limits)
        self.limiter.set_limits(rate_limits)

    async def _refresh_forever(self) -> None:
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._refresh_interval)
            self._wake.clear()
            if self._closing.is_set():
                return
            try:
                await self.refresh()
            except Exception:
                # Keep serving on the last good policy; say so loudly.
                log.exception("reloading prices, gates, budgets and limits failed")

    async def admit(
        self, principal: Principal, request: Inference, tier: ServiceTier,
        *, hold: Reservation | None = None, window: str | None = None,
    ) -> Admission:
        """Check every gate and take the request's holds, or raise its 403/429.
        A batch line's: ``hold``, the batch's budget hold, which the request's
        reservation is taken out of; ``window``, its completion window."""
        policy = self.policy
        _check_verification(policy, principal, request)
        approx_tokens = request.prompt_tokens + request.output_tokens_guess(_TPM_OUTPUT_GUESS)
        rate = await self.limiter.acquire(principal.org_id, tier, approx_tokens)
        most = self.max_cost(request, tier, window)
        try:
            if hold is not None:
                reservation = await self.budgets.carve(hold, most)
            else:
                reservation = await self.budgets.reserve(budget_scopes(principal), most)
        except BudgetExceeded as exc:
            self.limiter.give_back(rate)
            raise InsufficientQuotaError(_quota_message(principal, exc)) from None
        except BaseException:
            self.limiter.give_back(rate)  # a shared store away (503): nothing taken
            raise
        return Admission(policy.prices, reservation, rate, rate.headers, window=window)

    def max_cost(self, request: Inference, tier: ServiceTier, window: str | None = None) -> int:
        """The most ``request`` can cost on ``tier`` (pico-USD): what its budget hold is."""
        price = _price(self.policy.prices, request.model, tier, window)
        if price is None:
            return 0
        return max_cost(
            request.prompt_token_bound, self._max_output(request) * request.num_choices, price
        )

    def expected_cost(
        self, request: Inference, tier: ServiceTier, window: str | None = None
    ) -> int:
        """What ``request`` is expected to cost on ``tier`` (pico-USD): its
        prompt, and its output limit (or a guess where it sets none)."""
        price = _price(self.policy.prices, request.model, tier, window)
        if price is None:
            return 0
        return max_cost(request.prompt_tokens, request.output_tokens_guess(_TPM_OUTPUT_GUESS),
                        price)

    async def hold_budget(self, principal: Principal, amount: int) -> Reservation:
        """Hold ``amount`` for many requests to come (a batch's lines) when
        all of it fits in what the budgets have left, or raise the 429
        ``insufficient_quota`` a request would get."""
        try:
            return await self.budgets.reserve(budget_scopes(principal), amount, whole=True)
        except BudgetExceeded as exc:
            raise InsufficientQuotaError(_quota_message(principal, exc)) from None

    def release_budget(self, hold: Reservation) -> None:
        """Give back what a hold still has."""
        self.budgets.release(hold)

    def settle(self, admission: Admission | None, record: UsageRecord) -> None:
        """Cost a finished request onto its usage record and settle its holds."""
        tokens = TokenCounts(record.prompt_tokens, record.cached_tokens, record.completion_tokens)
        prices = admission.prices if admission is not None else self.policy.prices
        window = None if admission is None else admission.window
        price = _price(prices, record.model, ServiceTier(record.served_tier), window)
        record.price = price
        record.costs = billed_costs(record.status, tokens, price)
        list_price = prices.list_price(record.model)
        record.list_cost = (
            0
            if record.costs is NO_COST or list_price is None
            else line_costs(tokens, list_price).total
        )
        if admission is None or admission.done:
            return
        admission.done = True
        self.budgets.settle(admission.reservation, record.costs.total)
        self.limiter.settle(admission.rate, tokens.input + tokens.output)

    def release(self, admission: Admission) -> None:
        """An admitted request that never reached generation: charge nothing."""
        if admission.done:
            return
        admission.done = True
        self.budgets.release(admission.reservation)
        self.limiter.settle(admission.rate, 0)

    def _max_output(self, request: Inference) -> int:
        if request.max_output_tokens is not None:
            return request.max_output_tokens
        context = self._context_lengths.get(request.model)
        return min(context or self._max_output_tokens, self._max_output_tokens)


def _check_verification(policy: Policy, principal: Principal, request: Inference) -> None:
    gate = policy.model_gates.get(request.model)
    if gate is None or not needs_verification(gate, request.stream):
        return
    if principal.verification_status == "verified":
        return
    what = (
        f"stream the model `{request.model}`"
        if gate == "streaming"
        else f"use the model `{request.model}`"
    )
    if principal.verification_status == "pending":
        next_step = (
            "Its verification is pending review; try again once an operator has approved it."
        )
    else:
        again = " another" if principal.verification_status == "rejected" else " an"
        next_step = (
            f"An admin of the organization can submit{again} identity document with "
            "POST /v1/organization/verification (type, country, number); access follows "
            "within seconds of approval."
        )
    if principal.verification_status == "rejected":
        next_step = "Its last verification was rejected. " + next_step
    raise VerificationRequiredError(
        f"Your organization must be verified to {what}. {next_step}",
        param="stream" if gate == "streaming" else "model",
    )


def _price(
    prices: PriceCatalog, model: str, tier: ServiceTier, window: str | None
) -> ModelPrice | None:
    """A tier's price, or a batch line's in its completion window."""
    if window is not None and tier is ServiceTier.BATCH:
        return prices.batch_price(model, window)
    return prices.price(model, tier)


def budget_scopes(principal: Principal) -> tuple[str, ...]:
    """The scopes whose budgets a principal's requests count against."""
    return (org_scope(principal.org_id), project_scope(principal.project_id))


def _quota_message(principal: Principal, exc: BudgetExceeded) -> str:
    budget = "$" + format_micro_usd(exc.limit // (PICO_PER_USD // MICRO_PER_USD))
    if exc.scope.startswith("project:"):
        whose = f"project {principal.project_id}"
    else:
        whose = f"organization '{principal.org_name}'"
    return (
        f"You exceeded your current quota: the monthly budget of {whose} ({budget}) is spent. "
        "Requests are accepted again once the budget is raised or a new month begins (UTC)."
    )
