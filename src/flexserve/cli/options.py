"""What the billing and governance commands share: the database options, a
runner that opens the migrated database for one action, and table output.

Errors a command can expect (a bad price, an unknown organization…) become a
message on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from flexserve.accounts import AccountError
from flexserve.accounts.gates import GateError
from flexserve.billing.controls import ControlError
from flexserve.billing.pricing import PriceError
from flexserve.config import ConfigError, Settings, load_settings
from flexserve.store import Database
from flexserve.store.database import shown_url

_T = TypeVar("_T")
_Command = TypeVar("_Command", bound=Callable[..., None])
_EXPECTED = (AccountError, ConfigError, ControlError, GateError, PriceError)


def database_options(command: _Command) -> _Command:
    """The --db and --home options every database command takes."""
    command = click.option(
        "--home",
        envvar="FLEXSERVE_HOME",
        help="Data directory holding the SQLite file (default .flexserve).",
    )(command)
    command = click.option(
        "--db",
        envvar="FLEXSERVE_DB",
        help="Database URL (sqlite:///path, postgresql://user@host/db); default: SQLite in --home.",
    )(command)
    return command


def settings_for(db: str | None, home: str | None) -> Settings:
    try:
        return load_settings(overrides={"db": db, "home": home})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _not_up_yet(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the database server cannot be
    reached or is starting up, rather than that something was wrong."""
    try:
        from asyncpg.exceptions import CannotConnectNowError  # type: ignore[import-untyped]
    except ImportError:  # no PostgreSQL driver: SQLite only
        transient: tuple[type[BaseException], ...] = (OSError,)
    else:
        transient = (OSError, CannotConnectNowError)
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, transient):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


def until_ready(step: Callable[[], _T], deadline: float, *,
                retry: Callable[[click.ClickException], bool] = lambda _: True,
                waiting: str = "") -> _T:
    """``step()``, tried again each second while it stops with a reason
    ``retry`` accepts and ``deadline`` (``time.monotonic()``) is ahead: for
    commands started beside a database or Redis that is not ready yet.
    ``waiting``, if given, is said once, with the first reason."""
    said = False
    while True:
        try:
            return step()
        except click.ClickException as exc:
            if time.monotonic() + 1.0 >= deadline or not retry(exc):
                raise
            if waiting and not said:
                click.echo(f"{waiting}: {exc.message}", err=True)
                said = True
            time.sleep(1.0)


def run_db(settings: Settings, action: Callable[[Database], Awaitable[_T]], *, prepare: bool = True,
           announce: bool = True, wait: float = 0.0) -> _T:
    """Run ``action`` against the database once its schema is ready
    (``Database.prepare``: SQLite migrated, PostgreSQL checked; not with
    ``prepare=False``, for the commands that migrate), then close it; with
    ``announce``, tell the gateways sharing ``redis`` (``_announce``). A
    server that cannot be reached yet is tried again each second for up to
    ``wait`` seconds."""
    url = settings.database_url

    async def with_database() -> _T:
        database = Database.from_url(url)
        try:
            if prepare:
                await database.prepare()
            return await action(database)
        finally:
            await database.close()

    def once() -> _T:
        try:
            return asyncio.run(with_database())
        except _EXPECTED as exc:
            raise click.ClickException(str(exc)) from exc
        except (SQLAlchemyError, OSError) as exc:
            # The URL without its password: this message may end up in a CI log.
            raise click.ClickException(f"database {shown_url(url)}: {exc}") from exc

    result = until_ready(once, time.monotonic() + wait, retry=_not_up_yet)
    if announce:
        _announce(settings)
    return result


def _announce(settings: Settings) -> None:
    """Tell running gateways the database may have changed, where they share
    a Redis (setting ``redis``): they reload at once rather than within
    their refresh interval. Not being able to is only worth a warning."""
    if not settings.redis:
        return
    try:
        from flexserve.shared.changes import announce

        asyncio.run(announce(settings.redis, settings.redis_prefix))
    except Exception as exc:  # ImportError, RedisError, OSError: the change is stored all the same
        click.echo(f"warning: could not tell the gateways through Redis ({type(exc).__name__}: {exc}); "
                   "they pick the change up within their refresh interval", err=True)


def cli_actor() -> str:
    """Who the audit log says made a change from this shell."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in a bare container
        return "cli"


def echo_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, one row a line."""
    every = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in every) for i in range(len(header))]
    for row in every:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def utc_text(unix_seconds: int) -> str:
    """A moment as the CLI's tables show it: ``2026-12-03 07:20:16`` (UTC)."""
    moment = datetime.datetime.fromtimestamp(unix_seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")
