"""A response that reached its client is billed, always: kill -9 under
traffic (also with the database write-locked), the journal replayed at the
next start before the budgets are seeded, and a database outage bounded."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from conftest import Gateway, run_async, sim_engine, sim_model_id, wait_for
from flexserve.app import create_app
from flexserve.bench.ledger_kill import (
    Delivery,
    check,
    kill_under_traffic,
    ledger_rows,
    prepare_home,
    write_lock,
)
from flexserve.billing.budget import org_scope
from flexserve.billing.journal import JournalError, UsageJournal, encode_line
from flexserve.billing.usage import UsageRecord, UsageWriter
from flexserve.config import load_settings
from flexserve.store import Database
from flexserve.store.schema import organizations, usage_records


def restart_and_read_budget(home: Path) -> int:
    """Start the app in process on ``home`` (as `flexserve serve` would) and
    return the organization's month-to-date spend the budgets were seeded with."""

    async def spent() -> int:
        settings = load_settings(
            overrides={"home": str(home), "engine": "sim", "bootstrap_demo": False}, environ={}
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            services = app.state.services
            async with services.db.engine.connect() as conn:
                org_id = (await conn.execute(select(organizations.c.id))).scalar_one()
            return int(services.gate.budgets.spent(org_scope(org_id)))

    return run_async(spent())


def assert_every_delivery_billed_once(home: Path, deliveries: list[Delivery], lock_db: bool) -> None:
    budget_spent = restart_and_read_budget(home)
    result = check(deliveries, ledger_rows(home / "flexserve.db"), lock_db=lock_db)
    assert result.num_delivered > 20, result  # the kill did land under traffic
    assert (result.num_lost, result.num_doubled, result.num_token_mismatches) == (0, 0, 0), result
    assert result.tokens_billed_of_delivered == result.tokens_delivered
    # The budgets rebuilt at start-up count every row, replayed ones included.
    assert result.ledger_cost_pico > 0
    assert budget_spent == result.ledger_cost_pico
    assert not list((home / "usage-journal").glob("usage-*.jsonl"))  # replayed, then removed


def test_kill_9_under_traffic_bills_every_delivered_response(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = prepare_home(home)
    deliveries = kill_under_traffic(home, key, traffic_seconds=1.5, lock_seconds=0)
    assert_every_delivery_billed_once(home, deliveries, lock_db=False)


def test_kill_9_with_the_database_write_locked_bills_every_delivered_response(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    key = prepare_home(home)
    # For the last second before the kill no usage row can be committed.
    deliveries = kill_under_traffic(home, key, traffic_seconds=2.0, lock_seconds=1.0)
    journaled = [
        row for path in (home / "usage-journal").glob("usage-*.jsonl")
        for row in path.read_bytes().splitlines()
    ]
    assert journaled  # the rows the lock held back were only in the journal
    assert_every_delivery_billed_once(home, deliveries, lock_db=True)


@pytest.mark.sqlite_only  # a SQLite write lock stands in for the outage
def test_a_database_outage_is_bounded_and_every_row_lands(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_gateway(engines=[sim_engine()], engine="sim", usage_max_pending=5)
    model = sim_model_id(gateway)
    db_path = Path(gateway.settings.home) / "flexserve.db"
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    served: list[str] = []
    with gateway.http() as http, write_lock(db_path):
        refusal = None
        for _ in range(50):
            response = http.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                refusal = response
                break
            served.append(response.headers["x-request-id"])
        assert refusal is not None, "requests kept being served past the bound"
        assert len(served) == 5  # the bound, requests in flight aside (none here)
        assert refusal.status_code == 503
        assert int(refusal.headers["retry-after"]) >= 1
        assert refusal.headers["x-request-id"]
        assert refusal.json() == {"error": {
            "message": refusal.json()["error"]["message"], "type": "api_error", "param": None,
            "code": "ledger_unavailable",
        }}
    # The lock is gone: the waiting rows land and requests flow again.
    with gateway.http() as http:
        wait_for(lambda: http.post("/v1/chat/completions", json=body).status_code == 200,
                 timeout=60)
    wait_for(lambda: set(served) <= {row.request_id for row in ledger_rows(db_path)}, timeout=30)


# --- the journal and the writer, in process ------------------------------------


@pytest.fixture
async def db(tmp_db_url: str) -> AsyncIterator[Database]:
    database = Database.from_url(tmp_db_url)
    await database.migrate()
    yield database
    await database.close()


def record(request_id: str, **changes: Any) -> UsageRecord:
    fields: dict[str, Any] = dict(
        request_id=request_id, org_id="org-1", project_id="proj_1", api_key_id="key_1",
        model="sim-llama3-8b", requested_tier="auto", served_tier="flex", prompt_tokens=12,
        completion_tokens=34, queue_time=0.01, ttft=0.2, total_time=1.5, status="completed",
        created_at=1_750_000_000.0,
    )
    fields.update(changes)
    return UsageRecord(**fields)


async def stored(db: Database) -> dict[str, int]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            select(usage_records.c.request_id, usage_records.c.completion_tokens)
        )
        return {row[0]: row[1] for row in rows}


async def test_a_committed_batch_leaves_no_journal_behind(db: Database, tmp_path: Path) -> None:
    journal_dir = tmp_path / "journal"
    writer = UsageWriter(db, flush_interval=3600, journal=UsageJournal(journal_dir))
    await writer.start()
    writer.submit(record("req_1"))
    writer.submit(record("req_2"))
    segments = list(journal_dir.glob("usage-*.jsonl"))
    assert len(segments) == 1 and len(segments[0].read_bytes().splitlines()) == 2
    await writer.flush()
    assert not list(journal_dir.glob("usage-*.jsonl"))
    writer.submit(record("req_3"))  # a new segment for the next batch
    await writer.close()
    assert set(await stored(db)) == {"req_1", "req_2", "req_3"}
    assert not list(journal_dir.glob("usage-*.jsonl"))


async def test_replay_stores_journaled_rows_once_and_skips_a_torn_line(
    db: Database, tmp_path: Path,
) -> None:
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    # req_old was committed before the crash, with 1 token; its journal line says 99.
    writer = UsageWriter(db)
    writer.submit(record("req_old", completion_tokens=1))
    await writer.close()
    lines = [encode_line(record(rid, completion_tokens=99).to_row()) for rid in ("req_old", "req_a")]
    corrupt = bytearray(encode_line(record("req_corrupt").to_row()))
    corrupt[20] ^= 1  # a flipped bit: the checksum no longer matches
    torn = encode_line(record("req_torn").to_row())[:-30]  # cut mid-write, no newline
    (journal_dir / "usage-000000000000.jsonl").write_bytes(lines[0] + bytes(corrupt))
    (journal_dir / "usage-000000000001.jsonl").write_bytes(lines[1] + torn)
    writer = UsageWriter(db, journal=UsageJournal(journal_dir))
    await writer.start()
    assert await stored(db) == {"req_old": 1, "req_a": 99}  # first write wins, torn skipped
    assert writer.num_replayed == 2
    assert not list(journal_dir.glob("usage-*.jsonl"))
    # New rows go to segments numbered after the replayed ones.
    writer.submit(record("req_new"))
    assert [p.name for p in journal_dir.glob("usage-*.jsonl")] == ["usage-000000000002.jsonl"]
    await writer.close()


@pytest.mark.sqlite_only  # an unmigrated SQLite file makes every write fail
async def test_rows_kept_by_a_failed_close_are_replayed_at_the_next_start(
    tmp_db_url: str, tmp_path: Path,
) -> None:
    db = Database.from_url(tmp_db_url)  # not migrated: every write fails
    journal_dir = tmp_path / "journal"
    try:
        writer = UsageWriter(db, journal=UsageJournal(journal_dir))
        await writer.start()
        writer.submit(record("req_1"))
        with pytest.raises(Exception, match="usage_records"):
            await writer.close()
        await db.migrate()
        writer = UsageWriter(db, journal=UsageJournal(journal_dir))
        await writer.start()
        assert set(await stored(db)) == {"req_1"}
        await writer.close()
    finally:
        await db.close()


def test_one_process_owns_a_journal_at_a_time(tmp_path: Path) -> None:
    first = UsageJournal(tmp_path)
    first.open()
    with pytest.raises(JournalError, match="own home"):
        UsageJournal(tmp_path).open()
    first.close()
    second = UsageJournal(tmp_path)
    assert second.open() == []
    second.close()


@pytest.mark.sqlite_only  # a SQLite write lock stands in for the outage
def test_a_database_lock_does_not_hold_up_a_request(
    start_gateway: Callable[..., Gateway],
) -> None:
    """The journal write is on the request path; the database is not."""
    gateway = start_gateway(engines=[sim_engine()], engine="sim")
    model = sim_model_id(gateway)
    db_path = Path(gateway.settings.home) / "flexserve.db"
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    with gateway.http() as http, write_lock(db_path):
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        # Answered while nothing can be committed: the row is in the journal only.
        assert request_id not in {r.request_id for r in ledger_rows(db_path)}
        journal = Path(gateway.settings.home) / "usage-journal"
        assert any(request_id.encode() in p.read_bytes() for p in journal.glob("usage-*.jsonl"))
    wait_for(lambda: request_id in {r.request_id for r in ledger_rows(db_path)}, timeout=30)
    assert sqlite3.connect(str(db_path)).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    httpx.get(gateway.url + "/healthz").raise_for_status()
