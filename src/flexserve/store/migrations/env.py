"""Alembic's environment: migrate over the connection ``Database.migrate`` hands in."""

from __future__ import annotations

from alembic import context

from flexserve.store.schema import metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "FlexServe's migrations run through flexserve.store.Database.migrate(), "
            "which hands Alembic an open connection"
        )
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported")
run_migrations_online()
