"""`flexserve db …`: the database schema, upgraded on purpose where it is shared.

A SQLite database belongs to one gateway, which upgrades it as it starts. A
PostgreSQL database is shared by many gateways: a new FlexServe release's
migrations are run once, by an operator, with `flexserve db upgrade`; a
gateway started on a database at another revision refuses to start and
says so (``Database.prepare``).
"""

from __future__ import annotations

import click

from flexserve.cli.options import database_options, run_db, settings_for
from flexserve.store import Database
from flexserve.store.database import head_revision, known_revisions


@click.group()
def db() -> None:
    """Upgrade the database schema and see where it stands."""


@db.command("upgrade")
@database_options
@click.option("--wait", "wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              metavar="SECONDS",
              help="Wait up to SECONDS for the database server to accept connections "
                   "(started beside it, as in compose.yaml).")
def upgrade(db: str | None, home: str | None, wait: float) -> None:
    """Upgrade the schema to this FlexServe's revision (a no-op when it is there)."""

    async def migrate(database: Database) -> tuple[str | None, str | None]:
        before = await database.revision()
        await database.migrate()
        return before, await database.revision()

    before, after = run_db(settings_for(db, home), migrate, prepare=False, wait=wait)
    if before == after:
        click.echo(f"Schema already at revision {after}.")
    else:
        click.echo(f"Schema upgraded from {before or 'nothing'} to revision {after}.")


@db.command("status")
@database_options
def status(db: str | None, home: str | None) -> None:
    """Print the schema's revision and this FlexServe's; exit 1 if they differ."""
    current = run_db(settings_for(db, home), Database.revision, prepare=False)
    head = head_revision()
    click.echo(f"database revision: {current or 'none'}\nthis FlexServe:    {head}")
    if current != head:
        behind = current is None or current in known_revisions()
        click.echo("Run `flexserve db upgrade` to upgrade it." if behind
                   else "The database is newer than this FlexServe.", err=True)
        raise SystemExit(1)
