"""`flexserve plan`: how much flex a fleet sells beside its default traffic
within an SLO, at what revenue; the smallest fleet for a target; or, with
``--validate``, how far the planner is from a measured `bench tiers` run."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from flexserve.billing.pricing import PICO_PER_USD, PriceCatalog, PriceEntry
from flexserve.cli.options import database_options, settings_for
from flexserve.engines.sim.profiles import PROFILES
from flexserve.plan import report as plan_report
from flexserve.plan import traffic as plan_traffic
from flexserve.plan.day import DayPlan, Slo, day_summary, plan_day, size_fleet
from flexserve.plan.simulate import Replica, Window
from flexserve.scheduler.policy import SchedulerConfig
from flexserve.tiers import ServiceTier

# The flex backlog waits as long as it takes (no 429 on arrival): what is
# planned is what the engines can take, not how patient a client is.
BACKLOG_WAIT = 1e9


def _fleet(text: str) -> tuple[int, str]:
    """``"4x h100-llama3-8b"`` → (4, "h100-llama3-8b")."""
    count, _, profile = text.strip().partition("x")
    try:
        replicas = int(count.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected 'Nx PROFILE', e.g. '4x h100-llama3-8b'") from None
    profile = profile.strip()
    if replicas < 1 or profile not in PROFILES:
        raise click.BadParameter(f"{text!r}: at least 1 replica of one of: {', '.join(PROFILES)}")
    return replicas, profile


def _day(text: str) -> int:
    try:
        return int(datetime.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=datetime.UTC).timestamp())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a date, YYYY-MM-DD") from None


@click.command("plan")
@click.option("--fleet", default="1x h100-llama3-8b", show_default=True,
              help="Replicas and their sim profile, 'Nx PROFILE'.")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=256, show_default=True,
              help="Sequences each replica runs at once (vLLM's --max-num-seqs).")
@click.option("--cost-model", type=click.Choice(["flat", "calibrated"]), default="calibrated", show_default=True,
              help="The sim engine's cost of small steps (engines/sim/profiles.py).")
@click.option("--prefix-caching/--no-prefix-caching", default=False, show_default=True)
@click.option("--fit-steps", "steps_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A real engine's measured steps (JSONL: step_tokens, kv_tokens, seconds): the --fleet "
                   "profile's step costs are fitted to them (docs/plan.md).")
@click.option("--peak-rps", type=float, default=3.0, show_default=True,
              help="Synthetic traffic: default requests/s for the fleet at the busiest hour.")
@click.option("--trough", type=click.FloatRange(0, 1), default=0.4, show_default=True,
              help="Synthetic traffic: the quietest hour's rate as a fraction of the peak (1: flat).")
@click.option("--peak-hour", type=click.IntRange(0, 23), default=15, show_default=True)
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Default traffic from a JSONL trace (at, prompt_tokens, completion_tokens).")
@click.option("--ledger", "ledger_range", nargs=2, metavar="FROM TO",
              help="Default traffic from the usage ledger between two dates (YYYY-MM-DD, TO excluded).")
@click.option("--ttft-p99", type=float, help="Default's TTFT p99 goal, milliseconds.")
@click.option("--tpot-p99", type=float, help="Default's TPOT p99 goal, milliseconds (also the policy's tpot_slo).")
@click.option("--flex-headroom", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="The flex policy's starting headroom (raised, hour by hour, where the SLO needs it).")
@click.option("--levels", type=click.IntRange(min=1), default=6, show_default=True,
              help="Load levels simulated across the day (hours between them are interpolated).")
@click.option("--window", "window_seconds", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Simulated seconds measured per level (after --warmup).")
@click.option("--warmup", type=click.FloatRange(min=0), default=10.0, show_default=True)
@click.option("--flex-clients", type=click.IntRange(min=1),
              help="Flex requests kept in flight per replica (default: --max-num-seqs, more than flex may run).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--price-input", help="List (default-tier) price, USD per 1M input tokens (default: the database's).")
@click.option("--price-output", help="List price, USD per 1M output tokens.")
@click.option("--target-flex-tokens-per-day", type=float,
              help="Size the fleet: the fewest replicas that sell this many flex output tokens a day within the SLO.")
@click.option("--target-flex-revenue-per-day", type=float, metavar="USD",
              help="Size the fleet: the fewest replicas whose flex sells this many USD a day within the SLO.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--sweep", "sweep_spec", metavar="tpot_slo=MS,MS,…",
              help="Plan once per TPOT p99 goal: the flex each SLO setting sells.")
@click.option("--validate", "validate_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Replay a `flexserve bench tiers` report and print predicted against measured.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where plan.json and plan.html go (default: <home>/plan, which the operator's dashboard shows).")
@database_options
def plan(**options: Any) -> None:
    """Plan the flex a fleet can sell beside a day of default traffic."""
    if options["validate_path"] is not None:
        _validate(options["validate_path"])
        return
    replicas, profile = _fleet(options["fleet"])
    settings = settings_for(options["db"], options["home"])
    traffic = _traffic(options, settings.database_url)
    slo = Slo(_seconds(options["ttft_p99"]), _seconds(options["tpot_p99"]))
    window = _window(options, profile, slo)
    if options["steps_path"] is not None:
        from flexserve.plan.fit import fitted_profile

        try:
            fitted = fitted_profile(options["steps_path"], profile)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"profile {fitted.describe()}")
        window = dataclasses.replace(window, replica=dataclasses.replace(
            window.replica, profile=fitted.profile, cost_model="calibrated", calibration=fitted.describe()))
    catalog, model = _prices(options, settings.database_url, profile)
    levels = options["levels"]
    sizing = sweep = None
    tokens_target, usd_target = options["target_flex_tokens_per_day"], options["target_flex_revenue_per_day"]
    if tokens_target is not None and usd_target is not None:
        raise click.UsageError("size for flex tokens or for flex revenue, not both")
    if tokens_target is not None or usd_target is not None:
        measure: Callable[[DayPlan], float] | None = None
        if usd_target is not None:
            if catalog.price(model, ServiceTier.FLEX) is None:
                raise click.ClickException(f"no price for {model}: give --price-input and --price-output")
            target, what = usd_target * PICO_PER_USD, f"${usd_target:,.2f} of flex a day"

            def flex_revenue(day: DayPlan) -> float:
                return plan_report.revenue(day, catalog, model).get("flex", 0)

            measure = flex_revenue
        else:
            target, what = tokens_target, f"{tokens_target:,.0f} flex tokens/day"
        found, tried = size_fleet(traffic, window, slo, target, levels, options["max_replicas"],
                                  measure=measure)
        sizing = {"target_flex_tokens_per_day": tokens_target, "target_flex_revenue_per_day_usd": usd_target,
                  "replicas": None if found is None else found.replicas,
                  "tried": [day_summary(p) for p in tried]}
        result = found or tried[-1]
        click.echo(f"sizing: {'no fleet of up to ' + str(options['max_replicas']) if found is None else found.replicas} "
                   f"replica(s) for {what} (tried {', '.join(str(p.replicas) for p in tried)})")
    else:
        result = plan_day(traffic, replicas, window, slo, levels)
    if options["sweep_spec"]:
        sweep = _sweep(options["sweep_spec"], traffic, result.replicas, window, slo, levels, catalog, model)
    document = plan_report.report(result, catalog, model, shlex.join(["flexserve", *sys.argv[1:]]),
                                  sizing, sweep)
    out = options["out"] or Path(settings.home) / "plan"
    json_path, html_path = plan_report.write(out, document, result)
    for line in plan_report.lines(document):
        click.echo(line)
    for row in sweep or ():
        click.echo(f"sweep tpot_p99={row['tpot_p99_ms']} ms: flex {row['flex_output_tokens_per_day']:,} tokens/day, "
                   f"within SLO all day: {'yes' if row['within_slo_all_day'] else 'no'}")
    click.echo(f"report: {json_path} and {html_path}")


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _traffic(options: dict[str, Any], db_url: str) -> plan_traffic.Traffic:
    try:
        if options["trace_path"] is not None:
            return plan_traffic.from_trace(options["trace_path"])
        if options["ledger_range"]:
            start, end = (_day(d) for d in options["ledger_range"])
            return asyncio.run(plan_traffic.from_ledger(db_url, start, end))
        return plan_traffic.synthetic(options["peak_rps"], options["trough"], options["peak_hour"])
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _window(options: dict[str, Any], profile: str, slo: Slo) -> Window:
    seqs = options["max_num_seqs"]
    config = SchedulerConfig(flex_headroom=options["flex_headroom"], tpot_slo=slo.tpot_p99 or 0.0,
                             flex_max_wait=BACKLOG_WAIT)
    return Window(
        Replica(profile, seqs, options["cost_model"], None, options["prefix_caching"]),
        default_rate=0.0, duration=options["window_seconds"], warmup=options["warmup"],
        flex_clients=options["flex_clients"] or seqs, seed=options["seed"], scheduler=config,
    )


def _prices(options: dict[str, Any], db_url: str, profile: str) -> tuple[PriceCatalog, str]:
    from flexserve.billing.price_book import PriceBook, make_price
    from flexserve.store.database import Database

    model = PROFILES[profile].model_id
    if options["price_input"] is not None or options["price_output"] is not None:
        if options["price_input"] is None or options["price_output"] is None:
            raise click.ClickException("give both --price-input and --price-output")
        try:
            price = make_price(options["price_input"], options["price_output"])
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        return PriceCatalog([PriceEntry(model, ServiceTier.DEFAULT, price)]), model

    async def load() -> PriceCatalog:
        database = Database.from_url(db_url)
        try:
            await database.prepare()
            return await PriceBook(database).load()
        finally:
            await database.close()

    return asyncio.run(load()), model


def _sweep(spec: str, traffic: plan_traffic.Traffic, replicas: int, window: Window, slo: Slo, levels: int,
           catalog: PriceCatalog, model: str) -> list[dict[str, Any]]:
    name, _, values = spec.partition("=")
    if name.strip() != "tpot_slo" or not values:
        raise click.BadParameter(f"{spec!r}: expected tpot_slo=MS,MS,…", param_hint="--sweep")
    try:
        goals = [float(v) for v in values.split(",")]
    except ValueError:
        raise click.BadParameter(f"{spec!r}: the goals are milliseconds", param_hint="--sweep") from None
    rows = []
    for goal in goals:
        goal_slo = dataclasses.replace(slo, tpot_p99=goal / 1000)
        goal_window = dataclasses.replace(
            window, scheduler=dataclasses.replace(window.scheduler, tpot_slo=goal / 1000))
        result: DayPlan = plan_day(traffic, replicas, goal_window, goal_slo, levels)
        earned = plan_report.revenue(result, catalog, model)
        rows.append({"tpot_p99_ms": goal, **day_summary(result),
                     "flex_revenue_per_day_pico": earned.get("flex")})
    return rows


def _validate(path: Path) -> None:
    from flexserve.plan.validate import NotATiersReport, compare, lines

    try:
        result = compare(path)
    except NotATiersReport as exc:
        raise click.ClickException(f"{path}: {exc}") from exc
    for line in lines(result):
        click.echo(line)
