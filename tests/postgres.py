"""A throwaway PostgreSQL server for the tests, started from the installed
binaries the way an operator would: a fresh data directory (``initdb``), a
free loopback port, trust authentication for one role, stopped and removed
at the end. Each test that asks gets a database of its own, upgraded with
FlexServe's migrations (as `flexserve db upgrade` would).

Debian's ``postgresql`` package puts the server binaries in
``/usr/lib/postgresql/<major>/bin``, off ``PATH``; both are looked in.
PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` user the package creates (``runuser``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROLE = "flexserve"
HOW_TO_ENABLE = (
    "PostgreSQL is not installed: the tests on PostgreSQL did not run. Install its "
    "server (Debian: apt-get install postgresql; .ci/run does) to run them."
)


def find_bin_dir() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, if installed."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    return None


class PostgresServer:
    """One running server; ``new_database`` hands out migrated databases."""

    def __init__(self, bin_dir: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.port = port
        self._root = Path(tempfile.mkdtemp(prefix="flexserve-pg-"))
        self.data_dir = self._root / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self._root, "postgres")
        self._names = itertools.count(1)

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as_user, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", ROLE,
                  "--no-sync")
        self.resume()

    def pause(self) -> None:
        """Stop the server as an operator's restart would (its data kept)."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start it (again) on its port."""
        options = (f"-p {self.port} -k {self._root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=300")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-o", options,
                  "-l", str(self._root / "server.log"), "-w", "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self._root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def create_database(self, migrated: bool = True) -> str:
        """A new empty database's URL; ``migrated``: upgraded to FlexServe's schema."""
        name = f"test_{next(self._names)}"
        psql(self, f"CREATE DATABASE {name}")
        url = self.url(name)
        if migrated:
            from conftest import run_async
            from flexserve.store.database import Database

            async def migrate() -> None:
                database = Database.from_url(url)
                try:
                    await database.migrate()
                finally:
                    await database.close()

            run_async(migrate())
        return url


def psql(server: PostgresServer, *commands: str, database: str = "postgres") -> str:
    """Run SQL with the server's own client; its output, unaligned."""
    args: Sequence[str] = [str(server.bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(server.port),
                           "-U", ROLE, "-d", database, "-v", "ON_ERROR_STOP=1", "-At"]
    for command in commands:
        args = [*args, "-c", command]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"psql failed: {done.stderr}")
    return done.stdout
