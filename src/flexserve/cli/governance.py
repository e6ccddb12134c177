"""Organization commands beyond create/list: verification decisions, budgets,
rate limits and the audit log (`flexserve orgs reject|set-budget|set-rate-limit|audit`).

They join the ``orgs`` group at registration (``cli._register``). Every
change is written to the audit log with the shell's user as the actor.
"""

from __future__ import annotations

import json

import click
from sqlalchemy import select

from flexserve.accounts import AccountError
from flexserve.accounts.verification import Verifications
from flexserve.billing.controls import Controls
from flexserve.cli.options import cli_actor, database_options, echo_table, run_db, settings_for, utc_text
from flexserve.cli.projects import budget_micro, describe_budget
from flexserve.store.audit import AuditEntry, read_audit
from flexserve.store.database import Database
from flexserve.store.schema import organizations
from flexserve.tiers import ServiceTier


def verify_org_audited(settings_db: str | None, home: str | None, name: str) -> None:
    """`orgs verify`: approve NAME's pending document (or NAME itself), audited;
    exits 1 when the 90-day rule turns it into a rejection."""
    decision = run_db(
        settings_for(settings_db, home),
        lambda database: Verifications(database).verify(name, actor=cli_actor()),
    )
    if decision.status != "verified":
        raise click.ClickException(f"Organization {name!r} was rejected: {decision.reason}")
    click.echo(f"Organization {name!r} is verified.")


@click.command("reject")
@click.argument("name")
@click.option("--reason", required=True, help="Why; shown to the organization's admins.")
@database_options
def reject_org(name: str, reason: str, db: str | None, home: str | None) -> None:
    """Reject organization NAME's verification (its pending document, if any)."""
    run_db(
        settings_for(db, home),
        lambda database: Verifications(database).reject(name, reason, actor=cli_actor()),
    )
    click.echo(f"Organization {name!r} is rejected: {reason}")


@click.command("set-budget")
@click.argument("name")
@click.option("--monthly-usd", help="Hard budget per calendar month (UTC), in USD.")
@click.option("--none", "remove", is_flag=True, help="Remove the budget.")
@database_options
def set_org_budget(
    name: str, monthly_usd: str | None, remove: bool, db: str | None, home: str | None
) -> None:
    """Set organization NAME's hard monthly budget; once spent, its requests get
    429 insufficient_quota until the budget is raised or the month ends."""
    budget = budget_micro(monthly_usd, remove)
    run_db(
        settings_for(db, home),
        lambda database: Controls(database).set_org_budget(name, budget, actor=cli_actor()),
    )
    click.echo(f"Organization {name!r}: {describe_budget(budget)}.")


@click.command("set-rate-limit")
@click.argument("name")
@click.option(
    "--tier",
    type=click.Choice([t.value for t in ServiceTier]),
    required=True,
    help="The tier the limits apply to.",
)
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute (omit: no limit).")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute (omit: no limit).")
@database_options
def set_rate_limit(
    name: str, tier: str, rpm: int | None, tpm: int | None, db: str | None, home: str | None
) -> None:
    """Limit organization NAME's requests and tokens per minute on one tier
    (neither --rpm nor --tpm: remove the limits)."""
    run_db(
        settings_for(db, home),
        lambda database: Controls(database).set_rate_limit(
            name, ServiceTier(tier), rpm, tpm, actor=cli_actor()
        ),
    )
    shown = ", ".join(part for part in (rpm and f"{rpm} requests", tpm and f"{tpm} tokens") if part)
    click.echo(
        f"Organization {name!r} on {tier}: " + (f"{shown} per minute." if shown else "no limit.")
    )


@click.command("audit")
@click.argument("name", required=False)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Most entries to show, newest first.",
)
@database_options
def audit(name: str | None, limit: int, db: str | None, home: str | None) -> None:
    """Show the audit log: verification decisions and other changes (of
    organization NAME only, when given)."""
    entries = run_db(settings_for(db, home), lambda database: _audit(database, name, limit))
    rows = [
        (
            utc_text(e.created_at),
            e.actor,
            e.action,
            e.org_id or "-",
            json.dumps(e.detail, sort_keys=True),
        )
        for e in entries
    ]
    echo_table(("TIME (UTC)", "ACTOR", "ACTION", "ORGANIZATION", "DETAIL"), rows)


async def _audit(database: Database, name: str | None, limit: int) -> list[AuditEntry]:
    async with database.engine.connect() as conn:
        org_id = None
        if name is not None:
            org_id = (
                await conn.execute(select(organizations.c.id).where(organizations.c.name == name))
            ).scalar()
            if org_id is None:
                raise AccountError(f"no organization named {name!r}")
        return await read_audit(conn, org_id=org_id, limit=limit)


ORG_COMMANDS = (reject_org, set_org_budget, set_rate_limit, audit)
