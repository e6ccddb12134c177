"""Shared fixtures: real servers on loopback, real SQLite files, real keys.

With ``FLEXSERVE_TEST_DB=postgresql`` (``make test-postgres``) the gateways
and databases the tests ask for are on a throwaway PostgreSQL server
instead (``postgres.py``), each test's database its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import uvicorn

from flexserve.accounts import Accounts
from flexserve.api.connections import ConnectionGuard
from flexserve.app import create_app
from flexserve.config import Settings, load_settings
from flexserve.engines.base import Engine
from flexserve.store.database import Database
from postgres import HOW_TO_ENABLE, PostgresServer, find_bin_dir
from redis_server import Presences, RedisServer, redis_server_or_skip

T = TypeVar("T")
# The suite's databases on PostgreSQL rather than SQLite files.
ON_POSTGRES = os.environ.get("FLEXSERVE_TEST_DB", "sqlite") == "postgresql"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh loop in a fresh thread
    (safe to call from sync fixtures while pytest-asyncio owns a loop)."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """A uvicorn server on a loopback port, in a thread with its own loop."""

    def __init__(self, app: Any, port: int | None = None,
                 connections: ConnectionGuard | None = None) -> None:
        self.port = port or free_port()
        # With a guard, its protocol (caps and timeouts) as `flexserve serve` has it.
        options: dict[str, Any] = {"http": "httptools"}
        if connections is not None:
            options.update(connections.uvicorn_options())
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
            loop="asyncio", lifespan="on", timeout_graceful_shutdown=2, **options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server thread died during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 60 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def _make_org(db_url: str, name: str, admin: bool) -> tuple[str, str]:
    db = Database.from_url(db_url)
    try:
        await db.migrate()
        accounts = Accounts(db)
        await accounts.create_org(name)
        key_id, key = await accounts.create_key(name, admin=admin)
        return key_id, key
    finally:
        await db.close()


def sql_rows(db_url: str, statement: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of a SQL statement on ``db_url`` (SQLite or PostgreSQL), as
    dicts, committed: for tests that read (or set) what a gateway stored."""
    from sqlalchemy import text

    async def query() -> list[dict[str, Any]]:
        database = Database.from_url(db_url)
        try:
            async with database.engine.begin() as conn:  # committed: an UPDATE … RETURNING holds
                return [dict(row._mapping) for row in await conn.execute(text(statement), params)]
        finally:
            await database.close()

    return run_async(query())


def usage_rows(gateway: Gateway, request_id: str) -> list[dict[str, Any]]:
    """The gateway's ledger rows for one request, on whichever database it uses."""
    return sql_rows(gateway.db_url, "SELECT * FROM usage_records WHERE request_id = :request_id",
                    request_id=request_id)


def billed(gateway: Gateway, request_id: str) -> dict[str, Any]:
    """The one ledger row of a request, once the gateway has written it."""
    wait_for(lambda: len(usage_rows(gateway, request_id)) == 1)
    (row,) = usage_rows(gateway, request_id)
    return row


@dataclass
class Gateway:
    """A running FlexServe gateway and a key to call it with."""

    url: str
    api_key: str
    settings: Settings
    db_url: str

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0, **kw)

    def async_client(self, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0, **kw)

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=60
        )

    def new_key(self, org: str, admin: bool = False) -> str:
        return run_async(_make_org(self.db_url, org, admin))[1]


# Lines for the end of the run (the tail is what a CI log shows).
_session_reports: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _session_reports:
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ON_POSTGRES:
        skip = pytest.mark.skip(reason="about SQLite itself; the suite runs on PostgreSQL")
        for item in items:
            if "sqlite_only" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (skipped, saying how to
    enable it, where PostgreSQL is not installed — unless the suite was asked
    to run on it, which then fails)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if ON_POSTGRES:
            pytest.fail(HOW_TO_ENABLE)
        pytest.skip(HOW_TO_ENABLE)
    server = PostgresServer(bin_dir, free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A throwaway Redis server for the session (skipped, saying how to
    enable it, where redis-server is not installed)."""
    server = RedisServer(redis_server_or_skip(), free_port())
    server.start()
    yield server
    server.stop()
    _session_reports.append(server.report)


@pytest.fixture
async def presences(redis_server: RedisServer) -> AsyncIterator[Presences]:
    """Gateways' leases on the session's Redis, under a prefix of the test's own."""
    made = Presences(redis_server)
    yield made
    await made.close()


@pytest.fixture(scope="module")
def start_gateway(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Gateway]]:
    """Start gateways on demand; all are stopped at the end of the module.

    Not later: a gateway left running polls its engines, renews its leases in
    Redis and flushes its usage in this process while every later module's
    tests run, and in front of an engine its module has stopped it does so
    for nothing."""
    running: list[ServerThread] = []

    def start(engines: list[Engine] | None = None, *, org: str = "test-org", **overrides: Any) -> Gateway:
        """``org``: the organization the gateway's admin key is made in (gateways
        sharing a database each need one of their own)."""
        home = tmp_path_factory.mktemp("flexserve-home")
        if ON_POSTGRES and not overrides.get("db"):
            overrides["db"] = request.getfixturevalue("postgres").create_database()
        overrides.setdefault("home", str(home))
        overrides.setdefault("usage_flush_interval", 0.02)
        settings = load_settings(overrides=overrides, environ={})
        _, key = run_async(_make_org(settings.database_url, org, admin=True))
        connections = ConnectionGuard.from_settings(settings)
        server = ServerThread(
            create_app(settings, engines=engines, connections=connections), connections=connections
        )
        server.__enter__()
        running.append(server)
        return Gateway(server.url, key, settings, settings.database_url)

    yield start
    for server in reversed(running):
        server.__exit__(None, None, None)


def sim_engine(speed: float = 50.0, max_num_seqs: int = 16, profile: str = "h100-llama3-8b") -> Engine:
    from flexserve.engines.sim import SimEngine

    return SimEngine(profile, speed=speed, max_num_seqs=max_num_seqs)


@pytest.fixture(scope="module")
def sim_gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    """A gateway in front of an in-process sim engine (fast, deterministic)."""
    return start_gateway(engines=[sim_engine()], engine="sim")


def sim_model_id(gateway: Gateway) -> str:
    with gateway.http() as http:
        return str(http.get("/v1/models").json()["data"][0]["id"])


@contextlib.contextmanager
def serve_process(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`flexserve serve ARGS` as a user starts it (a real process, no
    FLEXSERVE_* from this environment but ``env``), on a free port with
    ``home``; yields it once /healthz answers, with its URL and its log file.
    Stopped at the end (SIGTERM, then SIGKILL) unless it already has."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLEXSERVE_")}
    environ.update(env or {})
    log = home / f"serve-{port}.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "flexserve.cli", "serve", "--port", str(port), "--home", str(home),
             *args],
            stdout=subprocess.DEVNULL, stderr=stderr, env=environ,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, 60, log.read_text)
        yield process, url, log
    finally:
        stop_process(process, 30)


def wait_healthy(process: subprocess.Popen[bytes], url: str, timeout: float,
                 why: Callable[[], str]) -> None:
    """Wait until ``url``/healthz answers 200; fail, saying ``why()``, if
    ``process`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, why()
        assert time.monotonic() < deadline, why()
        time.sleep(0.1)


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds, unless it has ended."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=timeout)


def cli_admin_key(db_url: str, home: Path, org: str = "acme") -> str:
    """A new organization's admin key, made by the CLI as an operator makes it."""
    cli = [sys.executable, "-m", "flexserve.cli"]
    subprocess.run([*cli, "orgs", "create", org, "--db", db_url, "--home", str(home)],
                   check=True, capture_output=True)
    return subprocess.run([*cli, "keys", "create", "--org", org, "--db", db_url, "--home", str(home)],
                          check=True, capture_output=True, text=True).stdout.strip()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def tmp_db_url(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if ON_POSTGRES:
        return str(request.getfixturevalue("postgres").create_database())
    return f"sqlite:///{tmp_path / 'flexserve.db'}"
