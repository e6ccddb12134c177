"""What keeping files' bytes in the database costs (`files_in_database`).

A file of ``--mib`` MiB is stored through one ``Files`` service and read
through another with a different directory (a second gateway), three times
each way; reported: the median seconds to store it on disk only, to store
it on disk and in the database, and for the second gateway's first read
(fetched from the database)::

    .venv/bin/python -m flexserve.bench.files_store                      # SQLite
    .venv/bin/python -m flexserve.bench.files_store --db postgresql://…  # PostgreSQL
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from flexserve.accounts import Accounts
from flexserve.bench.report import host_info, write_json
from flexserve.files import Files
from flexserve.store.database import Database

_BLOCK = (b"x" * 1023 + b"\n") * 64  # 64 KiB of 1 KiB lines


async def _content(mib: int) -> AsyncIterator[bytes]:
    for _ in range(mib * 16):
        yield _BLOCK


async def measure(db_url: str, folder: Path, mib: int, runs: int = 3) -> dict[str, Any]:
    db = Database.from_url(db_url)
    await db.migrate()
    try:
        org = await Accounts(db).create_org(f"bench-files-{time.time_ns()}")
        stored: dict[bool, list[float]] = {False: [], True: []}
        fetched: list[float] = []
        for in_database in (False, True):
            for run in range(runs):
                first = Files(db, folder / f"first-{in_database}-{run}", in_database=in_database)
                second = Files(db, folder / f"second-{in_database}-{run}", in_database=in_database)
                started = time.perf_counter()
                record = await first.create(org.id, "user_data", "bench.txt", _content(mib))
                stored[in_database].append(time.perf_counter() - started)
                if in_database:
                    started = time.perf_counter()
                    path = await second.local_path(await second.get(org.id, record.id))
                    fetched.append(time.perf_counter() - started)
                    assert path.stat().st_size == mib * 1024 * 1024
                await first.delete(org.id, record.id)
    finally:
        await db.close()
    return {
        "store_on_disk_s": round(statistics.median(stored[False]), 3),
        "store_on_disk_and_in_database_s": round(statistics.median(stored[True]), 3),
        "first_read_on_another_gateway_s": round(statistics.median(fetched), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="Database URL (default: a SQLite file in a temporary directory).")
    parser.add_argument("--mib", type=int, default=64, help="File size in MiB.")
    parser.add_argument("--out", type=Path, default=Path("reports/files-store.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flexserve-files-") as tmp:
        url = args.db or f"sqlite:///{tmp}/flexserve.db"
        figures = asyncio.run(measure(url, Path(tmp), args.mib))
    report = {"benchmark": "files-store", "host": host_info(), "database": url.split(":", 1)[0],
              "mib": args.mib, **figures}
    write_json(args.out, report)
    print(report["database"], f"{args.mib} MiB", figures)


if __name__ == "__main__":
    main()
