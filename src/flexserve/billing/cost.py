"""Cost arithmetic: pure functions over integers.

A price is micro-dollars per 1M tokens, which is pico-dollars per token
(``billing.pricing``), so every cost here is ``tokens × price`` in
pico-dollars, exact. Dollars appear only at the edges (``pico_to_usd``), as a
``Decimal``.

What is billed at all is decided in one place, ``is_billable``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from flexserve.billing.pricing import PICO_PER_USD, ModelPrice

# The statuses of a request that reached an engine and is billed: a completed
# one, and a stream cut short, by its client going away or by the server
# shutting down (it pays for the tokens it got). Anything else — an engine
# error, work the scheduler aborted or preempted, a non-streamed request the
# server ended at shutdown — costs nothing. A refusal before generation (429
# and the like) never becomes a usage record in the first place.
BILLABLE_STATUSES: tuple[str, ...] = ("completed", "client_disconnected", "server_shutdown")


def is_billable(status: str) -> bool:
    """Whether a usage record with this status is charged."""
    return status in BILLABLE_STATUSES


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """What a request used, split the way it is priced."""

    input: int  # every prompt token, cached ones included (OpenAI's `prompt_tokens`)
    cached_input: int  # the part of `input` served from a prompt cache
    output: int

    def __post_init__(self) -> None:
        if min(self.input, self.cached_input, self.output) < 0:
            raise ValueError(f"token counts cannot be negative: {self}")
        if self.cached_input > self.input:
            raise ValueError(f"cached input exceeds input: {self}")

    @property
    def uncached_input(self) -> int:
        return self.input - self.cached_input


@dataclass(frozen=True, slots=True)
class LineCosts:
    """A request's cost per line item, in pico-dollars."""

    input: int
    cached_input: int
    output: int

    @property
    def total(self) -> int:
        return self.input + self.cached_input + self.output


NO_COST = LineCosts(0, 0, 0)


def line_costs(tokens: TokenCounts, price: ModelPrice) -> LineCosts:
    """The cost of ``tokens`` at ``price``: Σ tokens × price, per line item."""
    return LineCosts(
        input=tokens.uncached_input * price.input,
        cached_input=tokens.cached_input * price.cached_input,
        output=tokens.output * price.output,
    )


def billed_costs(status: str, tokens: TokenCounts, price: ModelPrice | None) -> LineCosts:
    """What a finished request is charged: nothing unless billable and priced."""
    if price is None or not is_billable(status):
        return NO_COST
    return line_costs(tokens, price)


def max_cost(max_input_tokens: int, max_output_tokens: int, price: ModelPrice) -> int:
    """The most a request can cost: every prompt token at the dearer input
    price, and every token it may generate. Budgets reserve this."""
    return (
        max_input_tokens * max(price.input, price.cached_input) + max_output_tokens * price.output
    )


def pico_to_usd(pico: int) -> Decimal:
    """Pico-dollars as an exact ``Decimal`` number of dollars."""
    return Decimal(pico).scaleb(-12) if pico else Decimal(0)


def usd_to_pico(usd: Decimal) -> int:
    """Dollars (exact, at most 12 decimals) as pico-dollars."""
    pico = usd * PICO_PER_USD
    if pico != pico.to_integral_value():
        raise ValueError(f"{usd} USD is finer than a pico-dollar")
    return int(pico)
