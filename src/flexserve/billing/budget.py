"""Hard monthly budgets: reserve at admission, settle at the end.

A request reserves its *maximum* cost (every prompt token and every token it
may generate, at its tier's price) before it is admitted, and settles when it
ends: the reservation is released and the actual cost added to the month's
spend. A scope (an organization, a project) admits a request while its spend
plus what is reserved is still under its budget. So however many requests
arrive at once, the month's spend ends at most one request's maximum cost
over the budget: the last request admitted below the line.

``Budgets`` is the interface the gateway uses; ``LocalBudgets`` keeps the
numbers in this process (one gateway). ``flexserve.shared.budgets.RedisBudgets``
keeps them in Redis for several gateways, under the same contract; that is
why ``reserve`` and ``carve`` are coroutines while ``settle`` must never block.

Scopes are plain strings (``org:org-…``, ``project:proj_…``); amounts are
pico-dollars; months are UTC calendar months (``"2025-06"``).
"""

from __future__ import annotations

import abc
import datetime
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


def org_scope(org_id: str) -> str:
    return f"org:{org_id}"


def project_scope(project_id: str) -> str:
    return f"project:{project_id}"


def month_of(unix_seconds: float) -> str:
    """The UTC calendar month of a moment: ``"2025-06"``."""
    return month_bounds(unix_seconds)[0]


def month_start(unix_seconds: float) -> int:
    """Unix seconds at 00:00 UTC on the first day of that moment's month."""
    return int(month_bounds(unix_seconds)[1])


def month_bounds(unix_seconds: float) -> tuple[str, float, float]:
    """That moment's UTC month, and the unix seconds at which it begins and ends
    (the next month's first second)."""
    moment = datetime.datetime.fromtimestamp(unix_seconds, tz=datetime.UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        end = start.replace(year=start.year + 1, month=1)
    else:
        end = start.replace(month=start.month + 1)
    return f"{start.year:04d}-{start.month:02d}", start.timestamp(), end.timestamp()


class BudgetExceeded(Exception):
    """A scope's monthly budget is spent (or promised to requests in flight)."""

    def __init__(self, scope: str, limit: int, committed: int) -> None:
        super().__init__(f"{scope}: budget {limit} pico-USD, {committed} spent or reserved")
        self.scope = scope
        self.limit = limit  # pico-dollars
        self.committed = committed  # spent + reserved, pico-dollars


@dataclass(eq=False, slots=True)
class Reservation:
    """A hold on budget for one request in flight."""

    scopes: tuple[str, ...]
    amount: int  # pico-dollars held in each scope
    month: str  # the month it was made in: its cost belongs to that month
    settled: bool = False
    # In a shared store: the gateway lease it is held under, and the
    # store's own holds it is made of (name, amount); empty in one process.
    holder: str = ""
    parts: tuple[tuple[str, int], ...] = ()


class Budgets(abc.ABC):
    """Monthly budgets per scope. The contract:

    - ``reserve`` either holds ``amount`` in every scope or raises
      ``BudgetExceeded`` and holds nothing; it admits while, in each scope with
      a budget, spend + reserved < budget;
    - ``settle`` releases a reservation and adds the actual cost to the
      spend of the reservation's month; a second call changes nothing. It
      never blocks (an implementation that talks to a server queues it);
    - ``set_limits`` replaces every budget at once (the operator's settings).
    """

    @abc.abstractmethod
    def load_spent(self, month: str, spent: Mapping[str, int]) -> None:
        """Seed ``month``'s spend per scope, read from the ledger at start-up
        (an implementation whose store already holds it may ignore this)."""

    @abc.abstractmethod
    async def reserve(
        self, scopes: Sequence[str], amount: int, *, whole: bool = False
    ) -> Reservation:
        """``whole``: admit only when all of ``amount`` fits under each budget
        (a hold for many requests), not only while something is left."""

    @abc.abstractmethod
    def settle(self, reservation: Reservation, actual: int) -> None: ...

    def release(self, reservation: Reservation) -> None:
        """Give a reservation back unused: the request was never served."""
        self.settle(reservation, 0)

    @abc.abstractmethod
    async def carve(self, hold: Reservation, amount: int) -> Reservation:
        """A reservation of ``amount`` for one request, taken out of a larger
        ``hold`` made earlier for many (a batch's): what the hold still has is
        moved over without a new check; only the part it lacks is reserved
        afresh, as ``reserve`` would (and may raise ``BudgetExceeded``, holding
        nothing new)."""

    @abc.abstractmethod
    def set_limits(self, limits: Mapping[str, int]) -> None: ...

    @abc.abstractmethod
    def limit(self, scope: str) -> int | None:
        """The scope's monthly budget, pico-dollars; None: no budget."""

    async def start(self) -> None:
        """Begin (after ``load_spent``): a shared store takes the ledger's
        spend in and starts sending settlements; nothing for this process's."""

    async def close(self) -> None:
        """Hand over what is still queued (settlements not yet sent); nothing
        to do for budgets kept in this process."""


class LocalBudgets(Budgets):
    """Budgets kept in this process, seeded with the month's spend from the
    ledger at start-up (``load_spent``) and kept current by ``settle``."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._limits: dict[str, int] = {}
        self._spent: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        # The current month and its bounds (unix seconds): formatting a date on
        # every reserve and settle cost 3-6 µs, a comparison with the bounds does not.
        self._month, self._month_begins, self._month_ends = month_bounds(clock())

    def load_spent(self, month: str, spent: Mapping[str, int]) -> None:
        if month == self._current_month():
            self._spent = dict(spent)

    async def reserve(
        self, scopes: Sequence[str], amount: int, *, whole: bool = False
    ) -> Reservation:
        # No await in here: the check and the hold are one step of the loop,
        # so requests arriving together cannot all pass the same check.
        return self.reserve_now(scopes, amount, whole=whole)

    def reserve_now(self, scopes: Sequence[str], amount: int, *, whole: bool = False) -> Reservation:
        if amount < 0:
            raise ValueError(f"cannot reserve a negative amount: {amount}")
        month = self._current_month()
        for scope in scopes:
            limit = self._limits.get(scope)
            if limit is None:
                continue
            committed = self._spent.get(scope, 0) + self._reserved.get(scope, 0)
            if committed >= limit or (whole and committed + amount > limit):
                raise BudgetExceeded(scope, limit, committed)
        for scope in scopes:
            self._reserved[scope] = self._reserved.get(scope, 0) + amount
        return Reservation(tuple(scopes), amount, month)

    async def carve(self, hold: Reservation, amount: int) -> Reservation:
        if amount < 0:
            raise ValueError(f"cannot reserve a negative amount: {amount}")
        taken = 0 if hold.settled else min(amount, hold.amount)
        lacking = amount - taken
        if lacking:
            self.reserve_now(hold.scopes, lacking)
        hold.amount -= taken
        return Reservation(hold.scopes, amount, hold.month)

    def settle(self, reservation: Reservation, actual: int) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        for scope in reservation.scopes:
            left = self._reserved.get(scope, 0) - reservation.amount
            if left > 0:
                self._reserved[scope] = left
            else:
                self._reserved.pop(scope, None)
        # A request that began last month is that month's cost, not this one's.
        if actual and reservation.month == self._current_month():
            for scope in reservation.scopes:
                self._spent[scope] = self._spent.get(scope, 0) + actual

    def set_limits(self, limits: Mapping[str, int]) -> None:
        self._limits = dict(limits)

    def spent(self, scope: str) -> int:
        """This month's settled spend in ``scope``, pico-dollars."""
        self._current_month()
        return self._spent.get(scope, 0)

    def reserved(self, scope: str) -> int:
        """What requests in flight hold in ``scope`` now, pico-dollars."""
        return self._reserved.get(scope, 0)

    def limit(self, scope: str) -> int | None:
        return self._limits.get(scope)

    def _current_month(self) -> str:
        now = self._clock()
        if self._month_begins <= now < self._month_ends:
            return self._month
        month, self._month_begins, self._month_ends = month_bounds(now)
        if month != self._month:
            # A new month: spend starts from nothing; holds in flight stay.
            self._month = month
            self._spent = {}
        return month
