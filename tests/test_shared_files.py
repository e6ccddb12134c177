"""Files every gateway of a fleet reads (`files_in_database`): bytes stored
in the database with the file's row, fetched by a gateway that lacks them on
its own disk; gone from the database when the file is deleted. On SQLite and
on PostgreSQL (the Makefile's PG_TESTS)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from billing_support import new_org
from conftest import Gateway, sim_engine, wait_for
from flexserve.errors import NotFoundError
from flexserve.files import Files
from flexserve.store.database import Database
from flexserve.store.schema import file_contents

MODEL = "llama3-8b-sim-h100"
CONTENT = b"".join(f"line {i:07d} of a file larger than two chunks\n".encode() for i in range(60_000))


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def num_chunks(db: Database, file_id: str) -> int:
    async with db.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(file_contents)
                                       .where(file_contents.c.file_id == file_id))).scalar_one())


async def test_a_gateway_reads_a_file_another_stored_and_deletes_it_for_both(tmp_db_url: str,
                                                                             tmp_path: Path) -> None:
    db = Database.from_url(tmp_db_url)
    await db.migrate()
    try:
        from flexserve.accounts import Accounts

        org = await Accounts(db).create_org("files-org")
        first = Files(db, tmp_path / "gateway-1", in_database=True)
        second = Files(db, tmp_path / "gateway-2", in_database=True)
        record = await first.create(org.id, "user_data", "notes.txt", chunks(CONTENT))
        assert len(CONTENT) > 2 * 1024 * 1024 and await num_chunks(db, record.id) == 3
        # Not on the second gateway's disk: fetched from the database, whole.
        assert not (tmp_path / "gateway-2" / record.id).exists()
        path = await second.local_path(await second.get(org.id, record.id))
        assert path.read_bytes() == CONTENT
        # A gateway that keeps files on its disk only cannot read it: what the setting is for.
        local_only = Files(db, tmp_path / "gateway-3")
        assert not (await local_only.local_path(await local_only.get(org.id, record.id))).exists()
        await second.delete(org.id, record.id)
        assert await num_chunks(db, record.id) == 0
        with pytest.raises(NotFoundError):
            await first.get(org.id, record.id)
    finally:
        await db.close()


def test_two_gateways_on_one_database_share_uploads_and_batch_input(
        start_gateway: Callable[..., Gateway]) -> None:
    one = start_gateway(engines=[sim_engine()], engine="sim", files_in_database=True, org="files-gw-1")
    two = start_gateway(engines=[sim_engine()], engine="sim", files_in_database=True, org="files-gw-2",
                        db=one.db_url)
    org = new_org(one, "files-shared")
    lines = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 3}}) + "\n" for i in range(3))
    uploaded = org.client().files.create(file=("in.jsonl", lines.encode()), purpose="batch")
    on_two = org.client(org.key)
    on_two.base_url = f"{two.url}/v1"  # type: ignore[assignment]
    assert on_two.files.content(uploaded.id).content == lines.encode()
    batch = on_two.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_for(lambda: on_two.batches.retrieve(batch.id).status in ("completed", "failed"), timeout=60)
    done = on_two.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 3
    # Its output file, written by whichever gateway finished it, reads on the other one too.
    assert done.output_file_id is not None
    output = org.client().files.content(done.output_file_id).content.decode().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in output) == ["c0", "c1", "c2"]
