"""The database: URLs, SQLite pragmas, and migrations that match the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from flexserve.config import ConfigError
from flexserve.store import Database
from flexserve.store.database import async_url
from flexserve.store.schema import metadata

TABLES = {"organizations", "projects", "api_keys", "usage_records", "stored_responses", "files", "operator_keys"}


async def test_migrate_twice_creates_the_tables_once(tmp_path: Path) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path / 'nested' / 'dir' / 'fs.db'}")
    try:
        await db.migrate()
        await db.migrate()  # already at head: a no-op, not an error
        async with db.engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
            version = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).all()
    finally:
        await db.close()
    assert tables >= TABLES
    assert version == [("0012",)]
    assert (tmp_path / "nested" / "dir" / "fs.db").is_file()


async def test_migrations_create_exactly_the_schema_the_code_queries(tmp_db_url: str) -> None:
    db = Database.from_url(tmp_db_url)
    try:
        await db.migrate()
        async with db.engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), metadata)
            )
    finally:
        await db.close()
    assert diff == []


@pytest.mark.sqlite_only
async def test_sqlite_connections_get_the_pragmas(tmp_db_url: str) -> None:
    db = Database.from_url(tmp_db_url)
    try:
        async with db.engine.connect() as conn:
            values = {
                name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            }
    finally:
        await db.close()
    # synchronous: 1 is NORMAL
    assert values == {
        "journal_mode": "wal",
        "busy_timeout": 5000,
        "foreign_keys": 1,
        "synchronous": 1,
    }


async def test_foreign_keys_are_enforced(tmp_db_url: str) -> None:
    db = Database.from_url(tmp_db_url)
    try:
        await db.migrate()
        with pytest.raises(Exception, match="(?i)foreign key"):
            async with db.engine.begin() as conn:
                await conn.exec_driver_sql(
                    "INSERT INTO projects (id, org_id, name, created_at) "
                    "VALUES ('proj_x', 'org-missing', 'p', 0)"
                )
    finally:
        await db.close()


async def test_a_failed_transaction_rolls_back_ddl_too(tmp_db_url: str) -> None:
    # SQLite's driver runs DDL outside a transaction unless told otherwise;
    # migrations rely on the BEGIN that Database emits itself.
    db = Database.from_url(tmp_db_url)
    try:
        with pytest.raises(RuntimeError):
            async with db.engine.begin() as conn:
                await conn.exec_driver_sql("CREATE TABLE half_done (x INTEGER)")
                raise RuntimeError("a migration step failed")
        async with db.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await db.close()
    assert "half_done" not in tables


def test_plain_urls_get_the_async_driver(tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'a.db'}"
    assert Database.from_url(sqlite_url).engine.url.drivername == "sqlite+aiosqlite"
    for url in ("postgresql://user@localhost/flexserve", "postgres://user@localhost/flexserve"):
        resolved = async_url(url)
        assert resolved.drivername == "postgresql+asyncpg"
        assert (resolved.username, resolved.host, resolved.database) == (
            "user",
            "localhost",
            "flexserve",
        )
    # A URL that names its driver keeps it.
    assert async_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"


async def test_in_memory_sqlite_is_one_shared_database() -> None:
    db = Database.from_url("sqlite://")
    try:
        await db.migrate()
        async with db.engine.connect() as conn:  # another checkout: the same database
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await db.close()
    assert set(tables) >= TABLES


def test_unknown_database_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="db"):
        Database.from_url("mysql://user@localhost/flexserve")
    with pytest.raises(ConfigError, match="db"):
        Database.from_url("not a url")
