"""The price catalog in the database, and the TOML price files it is loaded from.

``PriceBook`` reads the whole catalog into an immutable ``PriceCatalog`` and
writes changes only after checking them against it: a change that would make
some tier's price impossible (``PriceError``) is refused, so the stored
catalog always builds.

A price file (the ``--config`` file, or one given to ``flexserve prices
load``) holds prices in USD per 1M tokens::

    [prices."o3"]              # the list (default-tier) price
    input = "10.00"
    cached_input = "2.50"      # optional; default: the input price
    output = "40.00"

    [prices."o3".flex]         # optional: a tier's price set outright
    input = "5.00"
    output = "20.00"

    [prices."o3".multipliers]  # optional: this model's own tier multipliers
    priority = "1.75"

    [tier_multipliers]         # optional: every model's tier multipliers
    flex = "0.5"

    [batch_windows]            # optional: a completion window's multiplier on
    "1h" = "1.5"               # the batch price (24h is the batch price itself)

Numbers may be TOML strings or numbers; strings are exact.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from flexserve.billing.pricing import (
    ModelPrice,
    MultiplierEntry,
    PriceCatalog,
    PriceEntry,
    PriceError,
    format_micro_usd,
    format_multiplier,
    parse_multiplier,
    parse_usd,
)
from flexserve.store.audit import append_audit
from flexserve.store.database import Database
from flexserve.store.schema import model_prices, tier_multipliers
from flexserve.tiers import ServiceTier

ALL_MODELS = "*"  # tier_multipliers.model for the global multipliers
# tier_multipliers.tier of a completion window's multiplier: "window:1h".
_WINDOW = "window:"
_TIER_NAMES = tuple(t.value for t in ServiceTier)


class PriceBook:
    """Reads and writes the price catalog."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def load(self) -> PriceCatalog:
        async with self._db.engine.connect() as conn:
            return await _load(conn)

    async def set_price(self, entry: PriceEntry, *, actor: str) -> PriceCatalog:
        """Set one model's price on one tier (its list price for ``default``)."""
        return await self.replace([entry], [], actor=actor, merge=True)

    async def set_multiplier(self, entry: MultiplierEntry, *, actor: str) -> PriceCatalog:
        """Set a tier multiplier, for one model or (``model=None``) for all."""
        return await self.replace([], [entry], actor=actor, merge=True)

    async def set_window(self, window: str, multiplier_bp: int, *, actor: str) -> PriceCatalog:
        """Set a completion window's multiplier on the batch price."""
        return await self.replace([], [], {window: multiplier_bp}, actor=actor, merge=True)

    async def replace(
        self,
        prices: list[PriceEntry],
        multipliers: list[MultiplierEntry],
        windows: dict[str, int] | None = None,
        *,
        actor: str,
        merge: bool = True,
    ) -> PriceCatalog:
        """Store ``prices``, ``multipliers`` and window multipliers over what is
        there (``merge``) or instead of it. Nothing is written unless the
        result builds."""
        current = await self.load() if merge else PriceCatalog()
        catalog = current.merged(prices, multipliers, windows)
        # Read, then a write-only transaction: on SQLite a transaction that
        # reads before it writes can fail at once when another connection
        # wrote in between. (Two operators editing prices in the same instant
        # could lose one edit; the audit log shows both.)
        async with self._db.engine.begin() as conn:
            await _store(conn, catalog)
            await append_audit(
                conn,
                actor=actor,
                action="prices.set",
                org_id=None,
                detail={
                    "prices": [_describe_price(e) for e in prices],
                    "multipliers": [_describe_multiplier(m) for m in multipliers],
                    "batch_windows": {w: format_multiplier(bp) for w, bp in (windows or {}).items()},
                    "merge": merge,
                },
            )
        return catalog


async def _load(conn: AsyncConnection) -> PriceCatalog:
    prices = [
        PriceEntry(
            row.model,
            ServiceTier(row.tier),
            ModelPrice(row.input_micro, row.cached_input_micro, row.output_micro),
        )
        for row in await conn.execute(select(model_prices))
    ]
    multipliers = []
    windows = {}
    for row in await conn.execute(select(tier_multipliers)):
        if row.tier.startswith(_WINDOW):
            windows[row.tier.removeprefix(_WINDOW)] = row.multiplier_bp
        else:
            multipliers.append(MultiplierEntry(
                None if row.model == ALL_MODELS else row.model, ServiceTier(row.tier),
                row.multiplier_bp,
            ))
    return PriceCatalog(prices, multipliers, windows)


async def _store(conn: AsyncConnection, catalog: PriceCatalog) -> None:
    # The catalog is small and changes rarely: rewriting it whole is portable
    # (no dialect-specific upsert) and atomic inside the caller's transaction.
    now = int(time.time())
    await conn.execute(delete(model_prices))
    await conn.execute(delete(tier_multipliers))
    if catalog.entries:
        await conn.execute(
            insert(model_prices),
            [
                {
                    "model": e.model,
                    "tier": e.tier.value,
                    "input_micro": e.price.input,
                    "cached_input_micro": e.price.cached_input,
                    "output_micro": e.price.output,
                    "updated_at": now,
                }
                for e in catalog.entries
            ],
        )
    rows = [
        {"model": m.model or ALL_MODELS, "tier": m.tier.value, "multiplier_bp": m.multiplier_bp,
         "updated_at": now}
        for m in catalog.multipliers
    ]
    rows += [
        {"model": ALL_MODELS, "tier": _WINDOW + window, "multiplier_bp": bp, "updated_at": now}
        for window, bp in sorted(catalog.windows.items())
    ]
    if rows:
        await conn.execute(insert(tier_multipliers), rows)


def _describe_price(entry: PriceEntry) -> dict[str, str]:
    return {
        "model": entry.model,
        "tier": entry.tier.value,
        "input": format_micro_usd(entry.price.input),
        "cached_input": format_micro_usd(entry.price.cached_input),
        "output": format_micro_usd(entry.price.output),
    }


def _describe_multiplier(entry: MultiplierEntry) -> dict[str, str]:
    return {
        "model": entry.model or ALL_MODELS,
        "tier": entry.tier.value,
        "multiplier": format_multiplier(entry.multiplier_bp),
    }


def make_price(input: Any, output: Any, cached_input: Any = None, *, where: str = "") -> ModelPrice:
    """A price from USD amounts; the cached-input price defaults to the input price."""
    prefix = f"{where}: " if where else ""
    try:
        input_micro = parse_usd(input, "input price")
        output_micro = parse_usd(output, "output price")
        cached_micro = (
            input_micro if cached_input is None else parse_usd(cached_input, "cached input price")
        )
    except PriceError as exc:
        raise PriceError(prefix + str(exc)) from None
    return ModelPrice(input_micro, cached_micro, output_micro)


def read_price_file(
    path: str | Path,
) -> tuple[list[PriceEntry], list[MultiplierEntry], dict[str, int]]:
    """The prices, tier multipliers and window multipliers in a TOML file;
    PriceError names what is wrong.

    A file without ``[prices]``, ``[tier_multipliers]`` or ``[batch_windows]``
    gives empty ones.
    """
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PriceError(f"price file {file}: {exc}") from exc
    # Like the settings, the tables may sit at the top or inside [flexserve].
    nested = data.get("flexserve")
    if isinstance(nested, dict) and any(
        name in nested for name in ("prices", "tier_multipliers", "batch_windows")
    ):
        data = nested
    prices: list[PriceEntry] = []
    multipliers: list[MultiplierEntry] = []
    for model, table in _table(data, "prices", str(file)).items():
        where = f"{file}: [prices.{model!r}]"
        if not isinstance(table, dict):
            raise PriceError(f"{where} must be a table")
        unknown = set(table) - {"input", "cached_input", "output", "multipliers", *_TIER_NAMES}
        if unknown:
            raise PriceError(f"{where}: unknown keys {sorted(unknown)}")
        prices.append(PriceEntry(model, ServiceTier.DEFAULT, _price_table(table, where)))
        for tier in ServiceTier:
            tier_table = table.get(tier.value)
            if tier is ServiceTier.DEFAULT or tier_table is None:
                continue
            tier_where = f"{where}.{tier.value}"
            if not isinstance(tier_table, dict):
                raise PriceError(f"{tier_where} must be a table")
            prices.append(PriceEntry(model, tier, _price_table(tier_table, tier_where)))
        own = table.get("multipliers", {})
        multipliers += _multipliers(own, model, f"{where}.multipliers")
    multipliers += _multipliers(
        _table(data, "tier_multipliers", str(file)), None, "[tier_multipliers]"
    )
    windows = {}
    for window, raw in _table(data, "batch_windows", str(file)).items():
        try:
            windows[window] = parse_multiplier(raw)
        except PriceError as exc:
            raise PriceError(f"{file}: [batch_windows] {window!r}: {exc}") from None
    return prices, multipliers, windows


def _table(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise PriceError(f"{where}: [{name}] must be a table")
    return table


def _price_table(table: dict[str, Any], where: str) -> ModelPrice:
    for key in ("input", "output"):
        if key not in table:
            raise PriceError(f"{where}: missing {key!r} (USD per 1M tokens)")
    return make_price(table["input"], table["output"], table.get("cached_input"), where=where)


def _multipliers(table: Any, model: str | None, where: str) -> list[MultiplierEntry]:
    if not isinstance(table, dict):
        raise PriceError(f"{where} must be a table")
    entries = []
    for name, raw in table.items():
        if name not in _TIER_NAMES or name == ServiceTier.DEFAULT.value:
            raise PriceError(f"{where}: {name!r} is not flex, batch or priority")
        try:
            entries.append(MultiplierEntry(model, ServiceTier(name), parse_multiplier(raw)))
        except PriceError as exc:
            raise PriceError(f"{where}: {exc}") from None
    return entries
