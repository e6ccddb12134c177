"""Prices: what a model's tokens cost on each tier, in integers.

Units (the whole of billing uses them):

- a **price** is micro-dollars per 1M tokens (``$1.10`` → ``1_100_000``).
  That is also exactly *pico-dollars per token*, so a cost is one integer
  product, ``tokens × price``, in pico-dollars, with nothing to round;
- a **tier multiplier** is in basis points (``0.5`` → ``5_000``).

A model's list price is its ``default``-tier price. Another tier's price is
either set explicitly for that model, or the list price times the tier's
multiplier (a per-model multiplier first, then the operator's global one, then
``DEFAULT_MULTIPLIERS``). A derived price must come out as a whole number of
micro-dollars per 1M tokens: the catalog refuses one that does not, so that
the price stored beside each cost is the exact price that cost was made from.

Everything here is pure: no I/O, no clock. ``PriceCatalog`` is an immutable
snapshot, swapped whole when prices change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from flexserve.tiers import ServiceTier

MICRO_PER_USD = 1_000_000
PICO_PER_USD = 1_000_000_000_000
BASIS_POINTS = 10_000

# The tier multipliers of OpenAI's Flex launch, in basis points.
DEFAULT_MULTIPLIERS: Mapping[ServiceTier, int] = {
    ServiceTier.DEFAULT: BASIS_POINTS,
    ServiceTier.FLEX: 5_000,
    ServiceTier.BATCH: 5_000,
    ServiceTier.PRIORITY: 20_000,
}

# The completion windows a batch may ask for, in seconds: OpenAI's 24h, and
# FlexServe's own shorter and longer ones.
BATCH_WINDOWS: Mapping[str, int] = {"1h": 3_600, "24h": 86_400, "7d": 604_800}
# OpenAI's window, whose price is the batch tier's own.
STANDARD_WINDOW = "24h"
# A window's price is the batch tier's times its multiplier (rounded up to a
# whole micro-dollar per 1M tokens): the sooner the results are due, the more
# the batch costs. The operator may set others.
DEFAULT_WINDOW_MULTIPLIERS: Mapping[str, int] = {"1h": 15_000, "24h": BASIS_POINTS, "7d": 8_000}

# Generous bounds that still keep every product far inside 64 bits per row.
_MAX_PRICE_USD = Decimal(1_000_000)  # per 1M tokens
_MAX_MULTIPLIER = Decimal(100)


class PriceError(ValueError):
    """A price or multiplier that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One tier's price for one model: micro-dollars per 1M tokens."""

    input: int  # uncached prompt tokens
    cached_input: int  # prompt tokens served from a prompt cache
    output: int  # completion tokens

    def scaled(self, multiplier_bp: int) -> ModelPrice | None:
        """This price times ``multiplier_bp`` basis points; None unless each
        part comes out as a whole number of micro-dollars."""
        parts = []
        for value in (self.input, self.cached_input, self.output):
            whole, rest = divmod(value * multiplier_bp, BASIS_POINTS)
            if rest:
                return None
            parts.append(whole)
        return ModelPrice(*parts)

    def scaled_up(self, multiplier_bp: int) -> ModelPrice:
        """This price times ``multiplier_bp`` basis points, each part rounded up
        to a whole micro-dollar (a price, not a cost: costs stay exact
        products of the price stored beside them)."""
        return ModelPrice(*(-(-value * multiplier_bp // BASIS_POINTS)
                            for value in (self.input, self.cached_input, self.output)))


def parse_usd(text: str | float | Decimal, what: str = "price") -> int:
    """A USD amount (``"1.10"``, ``1.1``) as integer micro-dollars.

    More than six decimals is refused rather than rounded: the operator meant
    a price, and a silently different one would be billed.
    """
    value = _decimal(text, what)
    if value < 0 or value > _MAX_PRICE_USD:
        raise PriceError(f"{what} {text!r} must be between 0 and {_MAX_PRICE_USD} USD")
    micro = value * MICRO_PER_USD
    if micro != micro.to_integral_value():
        raise PriceError(f"{what} {text!r} has more than 6 decimals (micro-dollar precision)")
    return int(micro)


def parse_multiplier(text: str | float | Decimal) -> int:
    """A tier multiplier (``"0.5"``) as integer basis points."""
    value = _decimal(text, "multiplier")
    if value < 0 or value > _MAX_MULTIPLIER:
        raise PriceError(f"multiplier {text!r} must be between 0 and {_MAX_MULTIPLIER}")
    bp = value * BASIS_POINTS
    if bp != bp.to_integral_value():
        raise PriceError(f"multiplier {text!r} has more than 4 decimals")
    return int(bp)


def _decimal(text: str | float | Decimal, what: str) -> Decimal:
    if isinstance(text, bool):
        raise PriceError(f"{what} {text!r} is not a number")
    # repr() of a float is its shortest round-tripping decimal: 1.1 → "1.1".
    raw = repr(text) if isinstance(text, float) else str(text)
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        raise PriceError(f"{what} {text!r} is not a number") from None
    if not value.is_finite():
        raise PriceError(f"{what} {text!r} is not a finite number")
    return value


def format_micro_usd(micro: int) -> str:
    """``1_100_000`` → ``"1.10"``: at least cents, more digits only when set."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_USD)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"


def format_multiplier(bp: int) -> str:
    whole, frac = divmod(bp, BASIS_POINTS)
    digits = f"{frac:04d}".rstrip("0") or "0"
    return f"{whole}.{digits}"


@dataclass(frozen=True, slots=True)
class PriceEntry:
    """One row of the catalog as an operator sets it."""

    model: str
    tier: ServiceTier  # DEFAULT: the list price; any other: an explicit override
    price: ModelPrice


@dataclass(frozen=True, slots=True)
class MultiplierEntry:
    model: str | None  # None: every model without its own
    tier: ServiceTier
    multiplier_bp: int


class PriceCatalog:
    """Every model's price on every tier, and on the batch tier in every
    completion window, derived once and looked up by key."""

    def __init__(
        self, prices: Iterable[PriceEntry] = (), multipliers: Iterable[MultiplierEntry] = (),
        windows: Mapping[str, int] | None = None,
    ) -> None:
        self._entries = {(e.model, e.tier): e.price for e in prices}
        self._multipliers = {(m.model, m.tier): m.multiplier_bp for m in multipliers}
        if any(tier is ServiceTier.DEFAULT for _, tier in self._multipliers):
            raise PriceError("the default tier has no multiplier: its price is the list price")
        self._prices: dict[tuple[str, ServiceTier], ModelPrice] = {}
        for model, tier in self._entries:
            if (
                tier is not ServiceTier.DEFAULT
                and (model, ServiceTier.DEFAULT) not in self._entries
            ):
                raise PriceError(
                    f"model {model!r} has a {tier.value} price but no default (list) price: "
                    "set the default price first"
                )
        for model in self.models():
            for tier in ServiceTier:
                self._prices[(model, tier)] = self._derive(model, tier)
        # The operator's window multipliers (the rest are the defaults).
        self._windows = dict(windows or {})
        for window in self._windows:
            if window not in BATCH_WINDOWS:
                raise PriceError(f"{window!r} is not a completion window: "
                                 + ", ".join(BATCH_WINDOWS))
            if window == STANDARD_WINDOW:
                raise PriceError(f"the {STANDARD_WINDOW} window costs the batch tier's price: "
                                 "set the batch multiplier instead")
        self._window_prices: dict[tuple[str, str], ModelPrice] = {}
        for model in self.models():
            batch = self._prices[(model, ServiceTier.BATCH)]
            for window in BATCH_WINDOWS:
                self._window_prices[(model, window)] = batch.scaled_up(
                    self.window_multiplier_bp(window))

    def models(self) -> list[str]:
        return sorted({model for model, tier in self._entries if tier is ServiceTier.DEFAULT})

    def price(self, model: str, tier: ServiceTier) -> ModelPrice | None:
        """The price of ``model`` on ``tier``; None for a model without a price."""
        return self._prices.get((model, tier))

    def batch_price(self, model: str, window: str) -> ModelPrice | None:
        """The price of a batch line of ``model`` due within ``window``."""
        return self._window_prices.get((model, window))

    def window_multiplier_bp(self, window: str) -> int:
        return self._windows.get(window, DEFAULT_WINDOW_MULTIPLIERS[window])

    @property
    def windows(self) -> dict[str, int]:
        """The window multipliers the operator set."""
        return dict(self._windows)

    def list_price(self, model: str) -> ModelPrice | None:
        return self._prices.get((model, ServiceTier.DEFAULT))

    def is_explicit(self, model: str, tier: ServiceTier) -> bool:
        """True when the operator set this tier's price for this model."""
        return (model, tier) in self._entries

    def multiplier_bp(self, model: str | None, tier: ServiceTier) -> int:
        for key in ((model, tier), (None, tier)):
            if key in self._multipliers:
                return self._multipliers[key]
        return DEFAULT_MULTIPLIERS[tier]

    @property
    def entries(self) -> list[PriceEntry]:
        return [PriceEntry(m, t, p) for (m, t), p in sorted(self._entries.items())]

    @property
    def multipliers(self) -> list[MultiplierEntry]:
        keyed = sorted(self._multipliers.items(), key=lambda kv: (kv[0][0] or "", kv[0][1].rank))
        return [MultiplierEntry(m, t, bp) for (m, t), bp in keyed]

    def _derive(self, model: str, tier: ServiceTier) -> ModelPrice:
        explicit = self._entries.get((model, tier))
        if explicit is not None:
            return explicit
        multiplier = self.multiplier_bp(model, tier)
        derived = self._entries[(model, ServiceTier.DEFAULT)].scaled(multiplier)
        if derived is None:
            raise PriceError(
                f"the {tier.value} price of {model!r} (list price × {format_multiplier(multiplier)}) "
                "is not a whole number of micro-dollars per 1M tokens: give the model its "
                f"own {tier.value} multiplier first (`flexserve prices set-multiplier "
                f"{tier.value} M --model {model}`), or set both prices in one price file"
            )
        return derived

    def merged(
        self, prices: Iterable[PriceEntry] = (), multipliers: Iterable[MultiplierEntry] = (),
        windows: Mapping[str, int] | None = None,
    ) -> PriceCatalog:
        """A new catalog with these entries set over this one's; raises
        PriceError when the result does not build."""
        price_map = {(e.model, e.tier): e for e in self.entries}
        price_map |= {(e.model, e.tier): e for e in prices}
        multiplier_map = {(m.model, m.tier): m for m in self.multipliers}
        multiplier_map |= {(m.model, m.tier): m for m in multipliers}
        return PriceCatalog(price_map.values(), multiplier_map.values(),
                            self._windows | dict(windows or {}))
