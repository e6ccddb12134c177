"""FlexServe on PostgreSQL as an operator runs it: `flexserve db upgrade`
once, then `flexserve serve --db postgresql://…` processes, spoken to with
the official SDK; on a throwaway server (``postgres.py``), skipped with a
note where PostgreSQL is not installed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from conftest import Gateway, run_async, serve_process, sim_engine, sim_model_id, sql_rows, wait_for
from postgres import PostgresServer, psql
from flexserve.api.errors import error_parts
from flexserve.store.database import Database, head_revision
from flexserve.store.schema import files

FLEXSERVE = [sys.executable, "-m", "flexserve.cli"]


def _flexserve(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEXSERVE, *args, "--home", str(home)], capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_gateway_refuses_a_database_not_upgraded_and_serves_once_it_is(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.create_database(migrated=False)
    refused = subprocess.run([*FLEXSERVE, "serve", "--engine", "sim", "--db", url, "--home", str(tmp_path)],
                             capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode != 0
    assert "has no FlexServe schema yet" in refused.stderr and "flexserve db upgrade" in refused.stderr
    assert "flexserve@127.0.0.1" in refused.stderr  # the database named, as the operator wrote it

    status = _flexserve("db", "status", "--db", url, home=tmp_path)
    assert status.returncode == 1 and "database revision: none" in status.stdout
    upgraded = _flexserve("db", "upgrade", "--db", url, home=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"from nothing to revision {head_revision()}" in upgraded.stdout
    again = _flexserve("db", "upgrade", "--db", url, home=tmp_path)
    assert f"already at revision {head_revision()}" in again.stdout
    assert _flexserve("db", "status", "--db", url, home=tmp_path).returncode == 0

    created = _flexserve("orgs", "create", "acme", "--db", url, home=tmp_path)
    assert created.returncode == 0, created.stderr
    key = _flexserve("keys", "create", "--org", "acme", "--db", url, home=tmp_path).stdout.split()[-1]
    with serve_process(tmp_path, "--engine", "sim", "--db", url,
                       env={"FLEXSERVE_BOOTSTRAP_DEMO": "false"}) as (_, base, _log):
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(
            model=model, service_tier="flex", max_tokens=5,
            messages=[{"role": "user", "content": "Say hello."}],
        )
        assert answer.service_tier == "flex" and answer.usage is not None
        request_id = answer._request_id
    # The ledger row is in PostgreSQL, once, at the tier served (flushed at shutdown at the latest).
    rows = psql(postgres, f"SELECT served_tier, completion_tokens FROM usage_records WHERE request_id = '{request_id}'",
                database=url.rsplit("/", 1)[1])
    assert rows.strip().splitlines() == [f"flex|{answer.usage.completion_tokens}"]


def test_told_to_wait_a_gateway_starts_once_the_schema_is_upgraded(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """As compose.yaml starts a gateway beside the service that upgrades."""
    url = postgres.create_database(migrated=False)
    upgrade = threading.Timer(3.0, lambda: _flexserve("db", "upgrade", "--db", url, home=tmp_path))
    upgrade.start()
    try:
        with serve_process(tmp_path, "--engine", "sim", "--db", url,
                           env={"FLEXSERVE_STARTUP_WAIT": "60"}) as (_, base, log):
            said = log.read_text()
            assert "Waiting for the database" in said and "flexserve db upgrade" in said
            assert httpx.get(base + "/healthz", timeout=10).status_code == 200
    finally:
        upgrade.join()


def test_a_database_at_a_newer_revision_is_refused_by_an_older_flexserve(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.create_database()
    psql(postgres, "UPDATE alembic_version SET version_num = '9999'", database=url.rsplit("/", 1)[1])
    refused = _flexserve("orgs", "create", "acme", "--db", url, home=tmp_path)
    assert refused.returncode != 0 and "is at schema revision 9999" in refused.stderr
    status = _flexserve("db", "status", "--db", url, home=tmp_path)
    assert status.returncode == 1 and "newer than this FlexServe" in status.stderr


def test_an_unreachable_database_is_named_without_a_traceback(tmp_path: Path) -> None:
    done = _flexserve("db", "upgrade", "--db", "postgresql://flexserve@127.0.0.1:1/none", home=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "127.0.0.1:1/none" in done.stderr


def test_upgrade_waits_for_a_server_still_starting_and_only_as_long_as_told(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """As compose.yaml's migrate service runs it, beside a PostgreSQL that is
    not up yet: ``--wait`` tries again until it is, then upgrades."""
    url = postgres.create_database(migrated=False)
    postgres.pause()
    try:
        started = time.monotonic()
        refused = _flexserve("db", "upgrade", "--wait", "2", "--db", url, home=tmp_path)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert 1.0 <= time.monotonic() - started < 30
        waiting = subprocess.Popen([*FLEXSERVE, "db", "upgrade", "--wait", "60", "--db", url,
                                    "--home", str(tmp_path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert waiting.poll() is None, waiting.communicate()
    finally:
        postgres.resume()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert f"to revision {head_revision()}" in out


def test_ten_seconds_without_the_database_lose_no_row_and_answer_no_500(
    postgres: PostgresServer, start_gateway: Callable[..., Gateway]
) -> None:
    """PostgreSQL stopped for 10 s under traffic, then started: a known key
    keeps being served (its last answer stands while the database is away),
    a key never seen gets a 503 asking to retry, and every response
    delivered has one ledger row once the database is back."""
    gateway = start_gateway(engines=[sim_engine()], engine="sim", db=postgres.create_database())
    unseen_key = gateway.new_key("other-org")
    model = sim_model_id(gateway)
    statuses: list[int] = []
    served: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with gateway.http() as http:
            while not stop.is_set():
                response = http.post("/v1/chat/completions", json={
                    "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    served.append(response.headers["x-request-id"])
                time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(served) >= 20)
        postgres.pause()
        time.sleep(10)
        during = len(served)
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            unseen = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {unseen_key}"},
                               json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        postgres.resume()
        wait_for(lambda: len(served) >= during + 20, timeout=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert unseen.status_code == 503 and unseen.json()["error"]["code"] == "service_unavailable"
    assert int(unseen.headers["retry-after"]) >= 1
    assert 500 not in statuses and len(served) > during > 20
    rows: list[str] = []

    def landed() -> bool:
        rows[:] = [r["request_id"] for r in sql_rows(gateway.db_url, "SELECT request_id FROM usage_records")]
        return len(rows) >= len(served)

    wait_for(landed, timeout=60)
    assert sorted(rows) == sorted(served)  # each delivered response billed once, nothing else


def test_a_nul_that_reaches_postgresql_is_the_clients_400_not_a_500(postgres: PostgresServer) -> None:
    """The net under the checks made where values are read: PostgreSQL's own
    refusal of a NUL, answered as the client's error."""
    async def look_up() -> BaseException:
        database = Database.from_url(postgres.create_database())
        try:
            async with database.engine.connect() as conn:
                await conn.execute(select(files.c.id).where(files.c.id == "file-\x00"))
        except DBAPIError as exc:
            return exc
        finally:
            await database.close()
        raise AssertionError("PostgreSQL took a NUL")

    status, body, _ = error_parts(run_async(look_up()))
    assert status == 400
    assert b"NUL character" in body and b'"code":"invalid_value"' in body
