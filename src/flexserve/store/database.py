"""The database engine: one ``AsyncEngine`` per process, built from a plain URL.

SQLite is the embedded default and PostgreSQL the scale-out one; both are
reached through SQLAlchemy's async Core, so the rest of FlexServe writes one
kind of query for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from flexserve.config import ConfigError

# The async driver FlexServe uses for each database an operator can name.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",  # the spelling Heroku and others hand out
}

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class Database:
    """A connection pool to FlexServe's database, and its migrations."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @classmethod
    def from_url(cls, url: str) -> Database:
        """Open a pool for ``url``; a URL without a driver gets the async one."""
        parsed = async_url(url)
        options: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            if parsed.database in (None, "", ":memory:"):
                # Each new connection would open its own empty in-memory
                # database: share one so the schema and the rows are seen.
                options["poolclass"] = StaticPool
            else:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        else:
            # A pooled connection the server has closed is found before use,
            # not by the request that draws it.
            options["pool_pre_ping"] = True

        try:
            engine = create_async_engine(parsed, **options)
        except ModuleNotFoundError as exc:
            install = "'flexserve[postgres]'" if exc.name == "asyncpg" else exc.name
            raise ConfigError(
                f"setting 'db': {parsed.drivername} needs the {exc.name} package "
                f"(pip install {install})"
            ) from exc
        if parsed.get_backend_name() == "sqlite":
            _configure_sqlite(engine)
        return cls(engine)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def dialect_name(self) -> str:
        """``sqlite`` or ``postgresql``: for the few statements that differ."""
        return self._engine.dialect.name

    @property
    def migrates_itself(self) -> bool:
        """SQLite belongs to one gateway, which upgrades it as it starts; a
        PostgreSQL database is shared, and upgraded once, on purpose
        (``flexserve db upgrade``), not by whichever gateway starts first."""
        return self.dialect_name == "sqlite"

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision (a no-op when it is there)."""
        async with self._engine.begin() as connection:
            await connection.run_sync(_upgrade_to_head)

    async def revision(self) -> str | None:
        """The schema revision the database is at (None: none yet)."""
        async with self._engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )

    async def prepare(self) -> None:
        """Make the schema ready for this FlexServe: upgrade a database that
        migrates itself; else check that it is at this FlexServe's revision."""
        if self.migrates_itself:
            await self.migrate()
            return
        current, head = await self.revision(), head_revision()
        if current != head:
            raise SchemaMismatchError(self.shown_url, current, head)

    @property
    def shown_url(self) -> str:
        return shown_url(self._engine.url)

    async def close(self) -> None:
        await self._engine.dispose()


class SchemaMismatchError(ConfigError):
    """A shared database at another schema revision than this FlexServe's."""

    def __init__(self, url: str, current: str | None, head: str) -> None:
        at = "has no FlexServe schema yet" if current is None else f"is at schema revision {current}"
        super().__init__(
            f"database {url} {at}; this FlexServe needs revision {head}. Upgrade it once, "
            f"from one machine, with `flexserve db upgrade --db URL`, then start the gateways "
            "(a database at a newer revision needs a newer FlexServe)."
        )
        self.current = current
        self.head = head


def shown_url(url: str | URL) -> str:
    """``url`` as an operator writes it (no driver), without its password:
    for messages that may reach a log."""
    parsed = make_url(url)
    return parsed.set(drivername=parsed.get_backend_name()).render_as_string(hide_password=True)


def known_revisions() -> set[str]:
    """Every schema revision this FlexServe's migrations know."""
    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def head_revision() -> str:
    """The newest schema revision this FlexServe's migrations know."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


def async_url(url: str) -> URL:
    """``url`` with the async driver FlexServe uses, unless it names one itself."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"setting 'db': {url!r} is not a database URL") from exc
    if "+" in parsed.drivername:
        return parsed
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ConfigError(
            f"setting 'db': unsupported database {parsed.drivername!r} "
            "(use sqlite:///path or postgresql://user@host/db)"
        )
    return parsed.set(drivername=driver)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code so no alembic.ini is needed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _upgrade_to_head(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        # The driver's own transaction handling starts transactions only before
        # DML, so DDL (a migration) would run outside one. Turn it off and emit
        # BEGIN ourselves (below), which makes migrations all-or-nothing.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never wait for the writer. busy_timeout: a writer waits
        # for another's lock instead of failing at once. NORMAL is durable
        # under WAL except for the last commits before a power loss.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")
