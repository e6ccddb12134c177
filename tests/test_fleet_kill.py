"""A fleet as an operator runs it — two `flexserve serve` processes on one
PostgreSQL database and one Redis, in front of one engine — with one
gateway killed (SIGKILL) under traffic: the other keeps serving, takes the
dead one's engine slots within its lease's TTL, and, once the killed one is
started again (its usage journal replayed), every response delivered has
exactly one ledger row."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from conftest import ServerThread, cli_admin_key, serve_process, sql_rows, wait_for
from flexserve.engines.sim import SimModel
from flexserve.engines.sim.server import create_sim_app
from postgres import PostgresServer
from redis_server import RedisServer, slot_leases

TTL = 2.0  # redis_lease_ttl of these gateways


@pytest.fixture
def engine() -> Iterator[ServerThread]:
    with ServerThread(create_sim_app(SimModel("h100-llama3-8b", speed=5.0, max_num_seqs=4))) as server:
        yield server


def test_a_gateway_killed_under_traffic_loses_nothing_and_its_slots_come_back(
    postgres: PostgresServer, redis_server: RedisServer, engine: ServerThread, tmp_path: Path,
) -> None:
    db_url = postgres.create_database()
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    key = cli_admin_key(db_url, tmp_path)
    env = {"FLEXSERVE_REDIS": redis_server.url, "FLEXSERVE_REDIS_PREFIX": prefix,
           "FLEXSERVE_REDIS_LEASE_TTL": str(TTL), "FLEXSERVE_UPSTREAM_CAPACITY": "4",
           "FLEXSERVE_BOOTSTRAP_DEMO": "false", "FLEXSERVE_USAGE_FLUSH_INTERVAL": "0.5"}
    args = ("--engine", "upstream", "--upstream", engine.url, "--db", db_url)
    homes = [tmp_path / "a", tmp_path / "b"]
    for home in homes:
        home.mkdir()
    delivered: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(urls: list[str], model: str) -> None:
        clients = [openai.OpenAI(base_url=u + "/v1", api_key=key, max_retries=0, timeout=30) for u in urls]
        i = 0
        while not stop.is_set():
            try:
                answer = clients[i % len(clients)].chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Go."}], max_tokens=20)
                with lock:
                    delivered.append(answer._request_id or "")
            except openai.APIConnectionError:
                pass  # the killed gateway: nothing delivered
            except BaseException as exc:  # checked by the test
                errors.append(exc)
                return
            i += 1

    slots_key = f"{prefix}:slots:upstream:{engine.url}"
    with serve_process(homes[1], *args, env=env) as (_, survivor_url, _):
        with serve_process(homes[0], *args, env=env) as (victim, victim_url, _):
            model = openai.OpenAI(base_url=survivor_url + "/v1", api_key=key).models.list().data[0].id
            threads = [threading.Thread(target=client_loop, args=([victim_url, survivor_url], model))
                       for _ in range(4)]
            for thread in threads:
                thread.start()
            wait_for(lambda: len(delivered) >= 40 or bool(errors), 60)
            assert not errors, errors
            with redis.Redis.from_url(redis_server.url) as client:
                assert client.zcard(f"{prefix}:gateways") == 2
                victim.kill()  # SIGKILL: no lease given back, no rows flushed
                victim.wait(timeout=10)
                served_before = len(delivered)
                killed_at = time.monotonic()

                def survivor_has_every_slot() -> bool:
                    leases = slot_leases(client.hgetall(slots_key))
                    return len(leases) == 1 and list(leases.values()) == [4]

                wait_for(survivor_has_every_slot, TTL + 3)
                freed_after = time.monotonic() - killed_at
                assert client.zcard(f"{prefix}:gateways") == 1
            wait_for(lambda: len(delivered) >= served_before + 40 or bool(errors), 60)  # still serving
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            assert not errors, errors
        assert freed_after <= TTL + 3
        # The killed gateway again: it replays the rows it had journaled.
        with serve_process(homes[0], *args, env=env):
            pass
    rows = sql_rows(db_url, "SELECT request_id FROM usage_records")
    ids = [row["request_id"] for row in rows]
    assert len(ids) == len(set(ids)), "a ledger row written twice"
    missing = set(delivered) - set(ids)
    assert not missing, f"{len(missing)} of {len(delivered)} delivered responses have no ledger row"
    print(f"FIGURE fleet-kill delivered={len(delivered)} rows={len(ids)} slots_back_after={freed_after:.2f}s")
