"""`flexserve batches …`: operators' view of every organization's batches.

These act on the database: a running gateway sees a cancel within a second
and ends the batch as `cancelled` (a batch no gateway runs is ended when one
next starts).
"""

from __future__ import annotations

import time

import click
import orjson

from flexserve.batches.service import batch_object, mark_cancelling
from flexserve.batches.store import BatchStore
from flexserve.cli.options import database_options, echo_table, run_db, settings_for
from flexserve.store.database import Database


@click.group()
def batches() -> None:
    """List, show and cancel batches across organizations."""


@batches.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="Most batches listed.")
@database_options
def list_batches(limit: int, db: str | None, home: str | None) -> None:
    """Every organization's batches, newest first."""
    rows, _ = run_db(settings_for(db, home),
                     lambda database: BatchStore(database).page(None, limit=limit))
    echo_table(
        ("ID", "ORG", "STATUS", "ENDPOINT", "DONE/FAILED/TOTAL", "CREATED"),
        [
            (r["id"], r["org_id"], r["status"], r["endpoint"],
             f"{r['completed']}/{r['failed']}/{r['total']}",
             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"])))
            for r in rows
        ],
    )


@batches.command("show")
@click.argument("batch_id")
@database_options
def show_batch(batch_id: str, db: str | None, home: str | None) -> None:
    """The batch object of BATCH_ID (batch_…), as the API shows it, with its organization."""

    async def show(database: Database) -> dict[str, object]:
        store = BatchStore(database)
        row = await store.get(None, batch_id)
        if row is None:
            raise click.ClickException(f"No batch {batch_id}.")
        return {**await batch_object(store, row), "org_id": row["org_id"]}

    document = run_db(settings_for(db, home), show)
    click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())


@batches.command("cancel")
@click.argument("batch_id")
@database_options
def cancel_batch(batch_id: str, db: str | None, home: str | None) -> None:
    """Cancel BATCH_ID: finished lines are kept, the rest get `batch_cancelled`."""
    changed = run_db(settings_for(db, home),
                     lambda database: mark_cancelling(BatchStore(database), None, batch_id))
    click.echo(f"Batch {batch_id}: {'cancelling' if changed else 'already cancelling or cancelled'}.")
