"""`flexserve prices …` and `flexserve models …`: the price catalog and the
models' verification gates.

A running gateway picks changes up within ``policy_refresh_interval`` seconds
(5 by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from flexserve.accounts.gates import GATE_LEVELS, ModelGates
from flexserve.billing.price_book import PriceBook, make_price, read_price_file
from flexserve.billing.pricing import (
    BATCH_WINDOWS,
    STANDARD_WINDOW,
    ModelPrice,
    MultiplierEntry,
    PriceCatalog,
    PriceEntry,
    PriceError,
    format_micro_usd,
    format_multiplier,
    parse_multiplier,
)
from flexserve.cli.options import cli_actor, database_options, echo_table, run_db, settings_for
from flexserve.config import Settings
from flexserve.tiers import ServiceTier

_T = TypeVar("_T")
_TIERS = [t.value for t in ServiceTier]


@click.group()
def prices() -> None:
    """Set and list model prices (USD per 1M tokens) and tier multipliers."""


@prices.command("set")
@click.argument("model")
@click.option("--input", "input_usd", required=True, help="USD per 1M uncached input tokens.")
@click.option("--output", "output_usd", required=True, help="USD per 1M output tokens.")
@click.option(
    "--cached-input", "cached_usd", help="USD per 1M cached input tokens (default: --input)."
)
@click.option(
    "--tier",
    type=click.Choice(_TIERS),
    default="default",
    show_default=True,
    help="default sets the list price; another tier overrides its multiplier.",
)
@database_options
def set_price(
    model: str,
    input_usd: str,
    output_usd: str,
    cached_usd: str | None,
    tier: str,
    db: str | None,
    home: str | None,
) -> None:
    """Set MODEL's price on a tier (its list price on the default tier)."""
    if not model.strip():
        raise click.BadParameter("the model id is empty", param_hint="MODEL")
    price = _checked(lambda: make_price(input_usd, output_usd, cached_usd))
    entry = PriceEntry(model, ServiceTier(tier), price)
    catalog = run_db(
        settings_for(db, home),
        lambda database: PriceBook(database).set_price(entry, actor=cli_actor()),
    )
    _echo_catalog(catalog, only=model)


@prices.command("set-multiplier")
@click.argument("tier", type=click.Choice([t for t in _TIERS if t != "default"]))
@click.argument("multiplier")
@click.option("--model", help="Only for this model (default: every model without its own).")
@database_options
def set_multiplier(
    tier: str, multiplier: str, model: str | None, db: str | None, home: str | None
) -> None:
    """Set TIER's price as MULTIPLIER times the list price (flex 0.5, batch 0.5 and
    priority 2.0 unless set)."""
    entry = MultiplierEntry(
        model, ServiceTier(tier), _checked(lambda: parse_multiplier(multiplier))
    )
    catalog = run_db(
        settings_for(db, home),
        lambda database: PriceBook(database).set_multiplier(entry, actor=cli_actor()),
    )
    _echo_catalog(catalog, only=model)


@prices.command("set-window")
@click.argument(
    "window", type=click.Choice([w for w in BATCH_WINDOWS if w != STANDARD_WINDOW]),
    metavar="WINDOW",
)
@click.argument("multiplier")
@database_options
def set_window(window: str, multiplier: str, db: str | None, home: str | None) -> None:
    """Price batches due within WINDOW at MULTIPLIER times the batch price
    (1h 1.5 and 7d 0.8 unless set; 24h is the batch price itself)."""
    bp = _checked(lambda: parse_multiplier(multiplier))
    catalog = run_db(
        settings_for(db, home),
        lambda database: PriceBook(database).set_window(window, bp, actor=cli_actor()),
    )
    _echo_catalog(catalog)


@prices.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--replace", is_flag=True, help="Drop every price not in FILE (default: merge).")
@database_options
def load_prices(file: str, replace: bool, db: str | None, home: str | None) -> None:
    """Load the [prices], [tier_multipliers] and [batch_windows] tables of a TOML FILE (such as
    the --config file, or src/flexserve/examples/prices.toml)."""
    entries, multipliers, windows = _checked(lambda: read_price_file(file))
    catalog = run_db(
        settings_for(db, home),
        lambda database: PriceBook(database).replace(
            entries, multipliers, windows, actor=cli_actor(), merge=not replace
        ),
    )
    click.echo(
        f"Loaded {len(entries)} prices, {len(multipliers)} multipliers and {len(windows)} "
        f"window multipliers from {file}.", err=True,
    )
    _echo_catalog(catalog)


@prices.command("list")
@database_options
def list_prices(db: str | None, home: str | None) -> None:
    """List every model's price on every tier, USD per 1M tokens."""
    catalog = run_db(settings_for(db, home), lambda database: PriceBook(database).load())
    if not catalog.models():
        click.echo(
            "No prices yet: set one with `flexserve prices set MODEL --input X --output Y`.",
            err=True,
        )
        return
    _echo_catalog(catalog)


def _echo_catalog(catalog: PriceCatalog, only: str | None = None) -> None:
    rows = []
    for model in catalog.models():
        if only is not None and model != only:
            continue
        for tier in sorted(ServiceTier, key=lambda t: t.rank):
            price = catalog.price(model, tier)
            assert price is not None
            if tier is ServiceTier.DEFAULT:
                source = "list price"
            elif catalog.is_explicit(model, tier):
                source = "set"
            else:
                source = f"list x {format_multiplier(catalog.multiplier_bp(model, tier))}"
            rows.append(_row(model, tier.value, price, source))
        for window in BATCH_WINDOWS:
            if window == STANDARD_WINDOW:
                continue
            price = catalog.batch_price(model, window)
            assert price is not None
            source = f"batch x {format_multiplier(catalog.window_multiplier_bp(window))}"
            rows.append(_row(model, f"batch {window}", price, source))
    echo_table(("MODEL", "TIER", "INPUT", "CACHED INPUT", "OUTPUT", "FROM"), rows)


def _row(model: str, tier: str, price: ModelPrice, source: str) -> tuple[str, ...]:
    return (model, tier, format_micro_usd(price.input), format_micro_usd(price.cached_input),
            format_micro_usd(price.output), source)


def _checked(parse: Callable[[], _T]) -> _T:
    """``parse()``, with a PriceError reported as the command's error."""
    try:
        return parse()
    except PriceError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def models() -> None:
    """Gate models behind organization verification."""


@models.command("gate")
@click.argument("model")
@click.option(
    "--verification",
    type=click.Choice(GATE_LEVELS),
    required=True,
    help="all: every request needs a verified organization; streaming: only "
    "streamed ones; none: open to all.",
)
@database_options
def gate_model(model: str, verification: str, db: str | None, home: str | None) -> None:
    """Set which requests to MODEL need a verified organization."""
    run_db(
        settings_for(db, home),
        lambda database: ModelGates(database).set_gate(model, verification, actor=cli_actor()),
    )
    what = {
        "none": "is open to every organization",
        "streaming": "needs a verified organization to stream",
        "all": "needs a verified organization",
    }[verification]
    click.echo(f"Model {model!r} {what}.")


@models.command("gates")
@database_options
def list_gates(db: str | None, home: str | None) -> None:
    """List the models that need a verified organization."""
    gates = run_db(settings_for(db, home), lambda database: ModelGates(database).load())
    if not gates:
        click.echo("No model is gated: every organization may use every model.", err=True)
        return
    echo_table(("MODEL", "VERIFICATION"), sorted(gates.items()))


def load_config_prices(settings: Settings, config_file: str) -> None:
    """At `flexserve serve --config FILE`: merge FILE's price tables, if it has
    any, into the catalog (the file wins over earlier CLI changes)."""
    entries, multipliers, windows = _checked(lambda: read_price_file(config_file))
    if not entries and not multipliers and not windows:
        return
    run_db(
        settings,
        lambda database: PriceBook(database).replace(
            entries, multipliers, windows, actor=f"config:{config_file}", merge=True
        ),
    )
    click.echo(
        f"Prices: {len(entries)} prices, {len(multipliers)} multipliers and {len(windows)} "
        f"window multipliers from {config_file}.", err=True,
    )
