"""`flexserve projects …`: projects, the tier `auto` means for each, their budgets.

A running gateway sees a new tier within the API key cache's lifetime (5 s)
and a new budget within ``policy_refresh_interval`` (5 s by default).
"""

from __future__ import annotations

import click

from flexserve.accounts.projects import PROJECT_TIERS, Projects
from flexserve.billing.controls import Controls
from flexserve.billing.pricing import PriceError, format_micro_usd, parse_usd
from flexserve.cli.options import cli_actor, database_options, echo_table, run_db, settings_for


@click.group()
def projects() -> None:
    """Create and list projects; set their default tier and budget."""


@projects.command("create")
@click.argument("name")
@click.option("--org", "org_name", required=True, help="Organization the project belongs to.")
@click.option(
    "--default-tier",
    type=click.Choice(PROJECT_TIERS),
    default="default",
    show_default=True,
    help="The tier `service_tier: auto` (or none) means.",
)
@database_options
def create_project(
    name: str, org_name: str, default_tier: str, db: str | None, home: str | None
) -> None:
    """Create project NAME in an organization and print its id on stdout."""
    project = run_db(
        settings_for(db, home),
        lambda database: Projects(database).create(
            org_name, name, default_service_tier=default_tier
        ),
    )
    click.echo(project.id)
    click.echo(f"Created project {name!r} in organization {org_name!r}.", err=True)


@projects.command("list")
@click.option("--org", "org_name", required=True, help="Organization whose projects to list.")
@database_options
def list_projects(org_name: str, db: str | None, home: str | None) -> None:
    """List an organization's projects, oldest first."""
    found = run_db(settings_for(db, home), lambda database: Projects(database).list(org_name))
    rows = [
        (
            p.id,
            p.name,
            p.default_service_tier,
            "-"
            if p.monthly_budget_micro is None
            else "$" + format_micro_usd(p.monthly_budget_micro),
        )
        for p in found
    ]
    echo_table(("ID", "NAME", "AUTO TIER", "MONTHLY BUDGET"), rows)


@projects.command("set-tier")
@click.argument("project_id")
@click.argument("tier", type=click.Choice(PROJECT_TIERS))
@database_options
def set_tier(project_id: str, tier: str, db: str | None, home: str | None) -> None:
    """Make `service_tier: auto` (or none) mean TIER for project PROJECT_ID (proj_…)."""
    run_db(
        settings_for(db, home),
        lambda database: Projects(database).set_tier(project_id, tier, actor=cli_actor()),
    )
    click.echo(f"Project {project_id}: `auto` now means {tier}.")


@projects.command("set-budget")
@click.argument("project_id")
@click.option("--monthly-usd", help="Hard budget per calendar month (UTC), in USD.")
@click.option("--none", "remove", is_flag=True, help="Remove the project's own budget.")
@database_options
def set_project_budget(
    project_id: str, monthly_usd: str | None, remove: bool, db: str | None, home: str | None
) -> None:
    """Set project PROJECT_ID's own monthly budget (on top of its organization's)."""
    budget = budget_micro(monthly_usd, remove)
    run_db(
        settings_for(db, home),
        lambda database: Controls(database).set_project_budget(
            project_id, budget, actor=cli_actor()
        ),
    )
    click.echo(f"Project {project_id}: {describe_budget(budget)}.")


def budget_micro(monthly_usd: str | None, remove: bool) -> int | None:
    """The --monthly-usd / --none pair as micro-dollars (None: no budget)."""
    if remove == (monthly_usd is not None):
        raise click.UsageError("give either --monthly-usd X or --none")
    if monthly_usd is None:
        return None
    try:
        return parse_usd(monthly_usd, "monthly budget")
    except PriceError as exc:
        raise click.BadParameter(str(exc), param_hint="--monthly-usd") from exc


def describe_budget(budget: int | None) -> str:
    return "no monthly budget" if budget is None else f"monthly budget ${format_micro_usd(budget)}"
