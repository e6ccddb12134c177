"""`flexserve orgs …` and `flexserve keys …`: accounts from the command line.

Every command opens the database named by ``--db`` (or SQLite in ``--home``),
brings its schema up to date, does its one thing and closes it. Errors are
reported on stderr with exit status 1.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import click

from flexserve.accounts import Accounts
from flexserve.cli.options import database_options, run_db, settings_for, utc_text
from flexserve.config import Settings

_T = TypeVar("_T")


def _run(settings: Settings, action: Callable[[Accounts], Awaitable[_T]]) -> _T:
    """Run ``action`` with the accounts of the migrated database."""
    return run_db(settings, lambda database: action(Accounts(database)))


@click.group()
def orgs() -> None:
    """Create, list and verify organizations."""


@orgs.command("create")
@click.argument("name")
@click.option(
    "--default-tier",
    type=click.Choice(["default", "flex", "priority"]),
    help="Tier that `service_tier: auto` means for its default project "
    "(default: the default_service_tier setting).",
)
@database_options
def create_org(name: str, default_tier: str | None, db: str | None, home: str | None) -> None:
    """Create organization NAME, with a default project."""
    settings = settings_for(db, home)
    tier = default_tier or settings.default_service_tier
    org = _run(settings, lambda accounts: accounts.create_org(name, tier))
    click.echo(f"Created organization {org.name!r} ({org.id}).")


@orgs.command("list")
@database_options
def list_orgs(db: str | None, home: str | None) -> None:
    """List organizations, oldest first."""
    found = _run(settings_for(db, home), lambda accounts: accounts.list_orgs())
    if not found:
        click.echo("No organizations yet: create one with `flexserve orgs create NAME`.", err=True)
        return
    rows = [("ID", "NAME", "VERIFICATION", "CREATED (UTC)")] + [
        (org.id, org.name, org.verification_status, utc_text(org.created_at)) for org in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


@orgs.command("verify")
@click.argument("name")
@database_options
def verify_org(name: str, db: str | None, home: str | None) -> None:
    """Mark organization NAME as verified: it may use what needs verification.

    Approves its pending identity document, if any; refused (exit 1) when that
    document verified another organization within 90 days. Audited.
    """
    from flexserve.cli.governance import verify_org_audited

    verify_org_audited(db, home, name)


@click.group()
def keys() -> None:
    """Create and revoke API keys."""


@keys.command("create")
@click.option("--org", "org_name", required=True, help="Organization the key belongs to.")
@click.option("--admin", is_flag=True, help="Let the key use the organization's admin endpoints.")
@click.option("--project", "project_id", help="Project id (proj_…); default: the default project.")
@database_options
def create_key(
    org_name: str, admin: bool, project_id: str | None, db: str | None, home: str | None
) -> None:
    """Create an API key and print it, alone, on stdout.

    The key is shown this once: only its hash is stored.
    """
    key_id, key = _run(
        settings_for(db, home),
        lambda accounts: accounts.create_key(org_name, admin=admin, project_id=project_id),
    )
    # Stdout carries the key alone, so that `KEY=$(flexserve keys create …)` works.
    click.echo(key)
    kind = "admin key" if admin else "key"
    click.echo(f"Created {kind} {key_id} for organization {org_name!r}.", err=True)


@keys.command("revoke")
@click.argument("key_id")
@database_options
def revoke_key(key_id: str, db: str | None, home: str | None) -> None:
    """Revoke the key with id KEY_ID (key_…); requests with it are refused."""
    _run(settings_for(db, home), lambda accounts: accounts.revoke_key(key_id))
    click.echo(f"Revoked key {key_id}.")
