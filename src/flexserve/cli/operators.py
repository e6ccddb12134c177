"""`flexserve operators …`: the keys that open the operator's dashboard."""

from __future__ import annotations


import click

from flexserve.accounts.operators import Operators
from flexserve.cli.options import database_options, echo_table, run_db, settings_for, utc_text


@click.group()
def operators() -> None:
    """Create, list and revoke operators' dashboard keys."""


@operators.command("create")
@click.argument("name")
@database_options
def create_operator(name: str, db: str | None, home: str | None) -> None:
    """Make a key for operator NAME: it signs in to /dashboard's operator view
    (every organization, verification decisions). Shown once."""
    made, key = run_db(settings_for(db, home), lambda database: Operators(database).create(name))
    click.echo(f"Created operator key {made.id} for {made.name!r}. Keep it now; it is not shown again:")
    click.echo(key)


@operators.command("list")
@database_options
def list_operators(db: str | None, home: str | None) -> None:
    """List operators' keys (never the keys themselves)."""
    found = run_db(settings_for(db, home), lambda database: Operators(database).list(),
                   announce=False)
    if not found:
        click.echo("No operator keys yet: make one with `flexserve operators create NAME`.", err=True)
        return
    echo_table(("ID", "NAME", "KEY", "CREATED (UTC)", "REVOKED (UTC)"), [
        (k.id, k.name, k.prefix, utc_text(k.created_at), utc_text(k.revoked_at) if k.revoked_at else "-")
        for k in found
    ])


@operators.command("revoke")
@click.argument("key_id")
@database_options
def revoke_operator(key_id: str, db: str | None, home: str | None) -> None:
    """Revoke operator key KEY_ID (opk_…): it opens no new dashboard session."""
    run_db(settings_for(db, home), lambda database: Operators(database).revoke(key_id))
    click.echo(f"Revoked operator key {key_id}.")
